//! Header maps as the ABI sees them: HTTP/2-style pseudo headers (`:method`, `:path`, `:authority`, `:scheme`,
//! `:status`) beside the regular headers, over hyper's request and response heads (no copy into another structure),
//! or over a plain list (HTTP call responses, local replies).
//!
//! A request's `Host` is its `:authority`, as in Envoy (whose codecs turn `Host` into `:authority`): the map a filter
//! sees has no `host` entry beside it (reading `host` gives the authority, as Envoy's does), nor the codec's
//! `transfer-encoding`.

use std::borrow::Cow;

use http::header::{HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, request, response};

use crate::abi::types::{HostResult, Status};

pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub enum Headers<'a> {
    Request(&'a mut request::Parts),
    Response(&'a mut response::Parts),
    /// Trailers.
    Map(&'a mut HeaderMap),
    List(&'a mut Pairs),
}

/// Whether a request header is in the map a filter sees: `host` is `:authority`, and `transfer-encoding` is the
/// codec's (Envoy's HTTP/1 codec takes it out of the map too; the upstream request is framed again).
fn visible(name: &HeaderName) -> bool {
    name != HOST && name != http::header::TRANSFER_ENCODING
}

/// How many of a request's headers a filter does not see (see [`visible`]).
pub fn hidden(headers: &HeaderMap) -> usize {
    usize::from(headers.contains_key(HOST)) + usize::from(headers.contains_key(http::header::TRANSFER_ENCODING))
}

fn name_of(name: &[u8]) -> Result<HeaderName, Status> {
    HeaderName::from_bytes(name).map_err(|_| Status::BadArgument)
}

fn value_of(value: &[u8]) -> Result<HeaderValue, Status> {
    HeaderValue::from_bytes(value).map_err(|_| Status::BadArgument)
}

/// Several values of one header, joined as Envoy joins them (cookies with `; `, the rest with `,`).
fn joined<'m>(map: &'m HeaderMap, name: &[u8]) -> Option<Cow<'m, [u8]>> {
    let name = HeaderName::from_bytes(name).ok()?;
    let mut values = map.get_all(&name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else { return Some(Cow::Borrowed(first.as_bytes())) };
    let sep: &[u8] = if name == http::header::COOKIE { b"; " } else { b"," };
    let mut out = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(values) {
        out.extend_from_slice(sep);
        out.extend_from_slice(v.as_bytes());
    }
    Some(Cow::Owned(out))
}

/// `Host` (which the proxy sets from the URI for HTTP/2 and absolute-form requests, and a filter may change), else
/// the URI's authority.
fn authority(parts: &request::Parts) -> Option<&[u8]> {
    match parts.headers.get(HOST) {
        Some(h) => Some(h.as_bytes()),
        None => parts.uri.authority().map(|a| a.as_str().as_bytes()),
    }
}

fn path(parts: &request::Parts) -> &[u8] {
    parts.uri.path_and_query().map_or(b"/", |p| p.as_str().as_bytes())
}

fn set_path(parts: &mut request::Parts, value: &[u8]) -> HostResult {
    let mut builder = Uri::builder();
    if let Some(s) = parts.uri.scheme() {
        builder = builder.scheme(s.clone());
    }
    if let Some(a) = parts.uri.authority() {
        builder = builder.authority(a.clone());
    }
    parts.uri = builder.path_and_query(value).build().map_err(|_| Status::BadArgument)?;
    Ok(())
}

impl Headers<'_> {
    pub fn get(&self, name: &[u8]) -> Option<Cow<'_, [u8]>> {
        match self {
            Headers::Request(p) => match name {
                b":method" => Some(Cow::Borrowed(p.method.as_str().as_bytes())),
                b":path" => Some(Cow::Borrowed(path(p))),
                b":authority" => authority(p).map(Cow::Borrowed),
                b":scheme" => Some(Cow::Borrowed(p.uri.scheme_str().unwrap_or("http").as_bytes())),
                // Envoy answers `host` with the authority, though its map has no `host` entry
                b"host" => authority(p).map(Cow::Borrowed),
                b"transfer-encoding" => None,
                _ => joined(&p.headers, name),
            },
            Headers::Response(p) => match name {
                b":status" => Some(Cow::Borrowed(p.status.as_str().as_bytes())),
                _ => joined(&p.headers, name),
            },
            Headers::Map(m) => joined(m, name),
            Headers::List(list) => {
                list.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| Cow::Borrowed(v.as_slice()))
            }
        }
    }

    /// All pairs, pseudo headers first, serialized for the guest.
    pub fn serialize(&self) -> Vec<u8> {
        let mut pseudo: Vec<(&[u8], &[u8])> = Vec::with_capacity(16);
        let map = match self {
            Headers::Request(p) => {
                pseudo.push((b":authority", authority(p).unwrap_or(b"")));
                pseudo.push((b":path", path(p)));
                pseudo.push((b":method", p.method.as_str().as_bytes()));
                pseudo.push((b":scheme", p.uri.scheme_str().unwrap_or("http").as_bytes()));
                pseudo.extend(
                    p.headers.iter().filter(|(k, _)| visible(k)).map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
                );
                return crate::abi::pairs::encode(pseudo.iter().copied());
            }
            Headers::Response(p) => {
                pseudo.push((b":status", p.status.as_str().as_bytes()));
                &p.headers
            }
            Headers::Map(m) => m,
            Headers::List(list) => {
                return crate::abi::pairs::encode(list.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            }
        };
        pseudo.extend(map.iter().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())));
        crate::abi::pairs::encode(pseudo.iter().copied())
    }

    /// Envoy's `byteSize()`, what `proxy_get_header_map_size` answers: the lengths of every name and value.
    pub fn byte_size(&self) -> usize {
        // the serialization: a count, then per pair two lengths (8 bytes) and two NULs, then names and values
        let bytes = self.serialize();
        let count = bytes.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes) as usize;
        bytes.len().saturating_sub(4 + 10 * count)
    }

    pub fn len(&self) -> usize {
        match self {
            Headers::Request(p) => p.headers.len() + 4 - hidden(&p.headers),
            Headers::Response(p) => p.headers.len() + 1,
            Headers::Map(m) => m.len(),
            Headers::List(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets a value, replacing any present.
    pub fn replace(&mut self, name: &[u8], value: &[u8]) -> HostResult {
        match self {
            Headers::Request(p) => match name {
                b":method" => p.method = Method::from_bytes(value).map_err(|_| Status::BadArgument)?,
                b":path" => set_path(p, value)?,
                b":authority" => {
                    p.headers.insert(HOST, value_of(value)?);
                }
                b":scheme" => {}
                // `host` is `:authority` (see the module's comment)
                _ => {
                    p.headers.insert(name_of(name)?, value_of(value)?);
                }
            },
            Headers::Response(p) => match name {
                b":status" => p.status = StatusCode::from_bytes(value).map_err(|_| Status::BadArgument)?,
                _ => {
                    p.headers.insert(name_of(name)?, value_of(value)?);
                }
            },
            Headers::Map(m) => {
                m.insert(name_of(name)?, value_of(value)?);
            }
            Headers::List(list) => {
                list.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
                list.push((name.to_ascii_lowercase(), value.to_vec()));
            }
        }
        Ok(())
    }

    /// Adds a value beside any present (pseudo headers are replaced: they have one value).
    pub fn add(&mut self, name: &[u8], value: &[u8]) -> HostResult {
        if name.first() == Some(&b':') {
            return self.replace(name, value);
        }
        match self {
            Headers::Request(p) => {
                p.headers.append(name_of(name)?, value_of(value)?);
            }
            Headers::Response(p) => {
                p.headers.append(name_of(name)?, value_of(value)?);
            }
            Headers::Map(m) => {
                m.append(name_of(name)?, value_of(value)?);
            }
            Headers::List(list) => list.push((name.to_ascii_lowercase(), value.to_vec())),
        }
        Ok(())
    }

    pub fn remove(&mut self, name: &[u8]) -> HostResult {
        if name.first() == Some(&b':') {
            return Ok(()); // pseudo headers cannot be removed; Envoy ignores it too
        }
        match self {
            Headers::Request(p) => {
                if let Ok(n) = HeaderName::from_bytes(name)
                    && n != HOST
                {
                    p.headers.remove(n);
                }
            }
            Headers::Response(p) => {
                if let Ok(n) = HeaderName::from_bytes(name) {
                    p.headers.remove(n);
                }
            }
            Headers::Map(m) => {
                if let Ok(n) = HeaderName::from_bytes(name) {
                    m.remove(n);
                }
            }
            Headers::List(list) => list.retain(|(k, _)| !k.eq_ignore_ascii_case(name)),
        }
        Ok(())
    }

    /// Replaces every regular header with `pairs` (pseudo headers in it are applied).
    pub fn set_all(&mut self, pairs: Pairs) -> HostResult {
        match self {
            // the authority stays: it is a pseudo header, set again only if `pairs` names it
            Headers::Request(p) => {
                let host = p.headers.remove(HOST);
                p.headers.clear();
                if let Some(h) = host {
                    p.headers.insert(HOST, h);
                }
            }
            Headers::Response(p) => p.headers.clear(),
            Headers::Map(m) => m.clear(),
            Headers::List(list) => list.clear(),
        }
        for (k, v) in pairs {
            self.add(&k, &v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn request() -> request::Parts {
        http::Request::builder()
            .method("GET")
            .uri("/search?q=1")
            .header("host", "shop.example")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn pseudo_headers_read_and_write_the_head() {
        let mut p = request();
        let mut h = Headers::Request(&mut p);
        assert_eq!(h.get(b":path").unwrap().as_ref(), b"/search?q=1");
        assert_eq!(h.get(b":authority").unwrap().as_ref(), b"shop.example");
        assert_eq!(h.get(b":method").unwrap().as_ref(), b"GET");
        assert_eq!(h.get(b"cookie").unwrap().as_ref(), b"a=1; b=2");
        h.replace(b":path", b"/other").unwrap();
        h.replace(b"X-Added", b"1").unwrap();
        h.add(b"x-added", b"2").unwrap();
        assert_eq!(h.get(b"x-added").unwrap().as_ref(), b"1,2");
        assert_eq!(h.replace(b"bad name", b"v"), Err(Status::BadArgument));
        assert_eq!(h.replace(b"x", b"bad\nvalue"), Err(Status::BadArgument));
        h.remove(b"x-added").unwrap();
        assert!(h.get(b"x-added").is_none());
        assert_eq!(p.uri.path(), "/other");
    }

    #[test]
    fn serialized_pairs_start_with_pseudo_headers() {
        let mut p = request();
        let h = Headers::Request(&mut p);
        let pairs = crate::abi::pairs::decode(&h.serialize()).unwrap();
        assert_eq!(pairs[0], (b":authority".to_vec(), b"shop.example".to_vec()));
        assert_eq!(pairs[2], (b":method".to_vec(), b"GET".to_vec()));
        assert_eq!(pairs.len(), 6, "four pseudo headers and two cookies: `host` is `:authority`, not beside it");
        assert!(!pairs.iter().any(|(k, _)| k == b"host"));
        assert_eq!(h.get(b"host").unwrap().as_ref(), b"shop.example", "`host` reads as the authority");
        assert_eq!(h.len(), 6);
    }

    #[test]
    fn response_status_is_a_pseudo_header() {
        let mut p = http::Response::builder().status(503).body(()).unwrap().into_parts().0;
        let mut h = Headers::Response(&mut p);
        assert_eq!(h.get(b":status").unwrap().as_ref(), b"503");
        h.replace(b":status", b"200").unwrap();
        assert_eq!(p.status, 200);
    }
}
