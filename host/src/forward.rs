//! What a proxy changes in a request or response it forwards: hop-by-hop headers removed (RFC 9110 §7.6.1, with
//! the ones `Connection` names), `X-Forwarded-For` and `X-Forwarded-Proto` appended, a client's
//! `x-equilibrio-upstream` dropped before any filter runs, and the filter's upstream list parsed.

use std::net::SocketAddr;

use http::header::{
    CONNECTION, HOST, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, UPGRADE,
};
use http::{HeaderMap, request};

/// The header through which the filter names the upstream hosts, in order (as with Envoy's `override_host`).
pub const UPSTREAM_HEADER: &str = equilibrio_filter::UPSTREAM_HEADER;

// Header names built once: a `&str` key is parsed and validated on every map operation.
pub static UPSTREAM: HeaderName = HeaderName::from_static(UPSTREAM_HEADER);
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.iter().any(|h| h == name)
}

/// Removes hop-by-hop headers, including those listed in `Connection`. (`Transfer-Encoding` is hyper's to manage.)
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // one pass over the (few) names; usually there is nothing, or only `connection`, to remove
    let mut doomed: Vec<HeaderName> = headers.keys().filter(|k| is_hop_by_hop(k)).cloned().collect();
    if doomed.is_empty() {
        return;
    }
    for value in headers.get_all(CONNECTION) {
        for name in value.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|n| !n.is_empty()) {
            if let Ok(n) = HeaderName::from_bytes(name) {
                doomed.push(n);
            }
        }
    }
    for name in &doomed {
        headers.remove(name);
    }
}

/// A client connection's address, with its `X-Forwarded-For` entry formatted once per connection rather than once
/// per request.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = HeaderValue::try_from(addr.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }
}

/// Prepares a client's request head for the filters and the upstream.
pub fn prepare_request(parts: &mut request::Parts, peer: &Peer) {
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&UPSTREAM);
    // an HTTP/2 (or absolute-form) request carries the authority in the URI; HTTP/1.1 upstreams need `Host`
    if !parts.headers.contains_key(HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(HOST, v);
    }
    append_forwarded_for(&mut parts.headers, peer);
    parts.headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
}

/// Appends the peer to `X-Forwarded-For` (joining several headers into one), as Envoy does with
/// `use_remote_address: true`.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        headers.insert(X_FORWARDED_FOR.clone(), peer.ip.clone());
        return;
    }
    let mut value = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            if !value.is_empty() {
                value.push_str(", ");
            }
            value.push_str(s.trim());
        }
    }
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(peer.ip.to_str().unwrap_or_default());
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// The filter's upstream list: distinct `ip:port` entries in order, at most `max`; anything unparsable is skipped.
pub fn parse_upstreams(value: &[u8], max: usize) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(3);
    for item in value.split(|b| *b == b',') {
        let Ok(text) = std::str::from_utf8(item) else { continue };
        let Ok(addr) = text.trim().parse::<SocketAddr>() else { continue };
        if !out.contains(&addr) {
            out.push(addr);
            if out.len() == max {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hop_by_hop_headers_go_including_the_listed_ones() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn a_client_upstream_header_is_dropped_and_xff_appended() {
        let (mut parts, ()) = http::Request::builder()
            .uri("/")
            .header(UPSTREAM_HEADER, "10.0.0.1:80")
            .header("x-forwarded-for", "1.1.1.1")
            .header("x-forwarded-for", "2.2.2.2")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut parts, &Peer::new("127.0.0.1:5000".parse().unwrap()));
        assert!(!parts.headers.contains_key(UPSTREAM_HEADER));
        assert_eq!(parts.headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
    }

    #[test]
    fn xff_is_created_when_absent() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &Peer::new("[::1]:5000".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn http2_authority_becomes_host() {
        let (mut parts, ()) = http::Request::builder().uri("http://shop.example/x").body(()).unwrap().into_parts();
        prepare_request(&mut parts, &Peer::new("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(parts.headers["host"], "shop.example");
    }

    #[test]
    fn upstream_list_is_distinct_ordered_and_bounded() {
        let v = b"127.0.0.1:1, junk,127.0.0.1:2,127.0.0.1:1, [::1]:3, 127.0.0.1:4";
        let got = parse_upstreams(v, 3);
        let want: Vec<SocketAddr> =
            vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "[::1]:3".parse().unwrap()];
        assert_eq!(got, want);
        assert!(parse_upstreams(b"", 3).is_empty());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(v in proptest::collection::vec(any::<u8>(), 0..100)) {
            prop_assert!(parse_upstreams(&v, 3).len() <= 3);
        }
    }
}
