//! What a proxy changes in a request or response it forwards: hop-by-hop headers removed (RFC 9110 §7.6.1, with
//! the ones `Connection` names), `X-Forwarded-For` and `X-Forwarded-Proto` appended, a client's
//! `x-equilibrio-upstream` dropped before any filter runs, and the filter's upstream list read.

use std::net::SocketAddr;

use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, UPGRADE};
use http::{HeaderMap, request};

/// The header through which the filter names the upstream hosts, in order (as with Envoy's `override_host`).
pub const UPSTREAM_HEADER: &str = equilibrio_contract::UPSTREAM_HEADER;

// Header names built once: a `&str` key is parsed and validated on every map operation.
pub static UPSTREAM: HeaderName = HeaderName::from_static(UPSTREAM_HEADER);
/// Sent by the supervisor's health checks; answered with [`PROXY_MARK`] (routing-loop guard, see the supervisor's
/// `monitor` module).
pub static HEALTH_CHECK: HeaderName = HeaderName::from_static("x-equilibrio-health-check");
pub static PROXY_MARK: HeaderName = HeaderName::from_static("x-equilibrio-proxy");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Connection-specific headers, not forwarded. `Trailer` is not among them (RFC 9110 sec. 6.6.2; Envoy passes it on).
static HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    UPGRADE,
];

/// Removes hop-by-hop headers, including those listed in `Connection`. (`Transfer-Encoding` is hyper's to manage.)
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // one pass over the (few) names, noting which hop-by-hop ones are there: usually none, or only `connection`
    let mut found = 0u8;
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            found |= 1 << i;
        }
    }
    if found == 0 {
        return;
    }
    // other names `Connection` lists (its usual `keep-alive` and `close` need no parsing)
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            let usual = token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || HOP_BY_HOP.iter().any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes()));
            if !usual && let Ok(n) = HeaderName::from_bytes(token) {
                listed.push(n);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in &listed {
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

/// The hosts a request may try, in order, distinct, at most `max`: the filter's list (parsed only as far as attempts
/// need it: most requests use the first host only; anything unparsable is skipped), or a fixed list.
pub struct Upstreams {
    source: Source,
    max: usize,
    first: Option<SocketAddr>,
    /// Hosts given after the first (kept for distinctness; allocated only when a request retries).
    more: Vec<SocketAddr>,
}

enum Source {
    Header { value: HeaderValue, pos: usize },
    Fixed(std::vec::IntoIter<SocketAddr>),
}

impl Upstreams {
    /// The filter's comma-separated `ip:port` list.
    pub fn listed(value: HeaderValue, max: usize) -> Upstreams {
        Upstreams { source: Source::Header { value, pos: 0 }, max, first: None, more: Vec::new() }
    }

    pub fn fixed(list: Vec<SocketAddr>, max: usize) -> Upstreams {
        Upstreams { source: Source::Fixed(list.into_iter()), max, first: None, more: Vec::new() }
    }

    fn candidate(&mut self) -> Option<Option<SocketAddr>> {
        match &mut self.source {
            Source::Fixed(list) => list.next().map(Some),
            Source::Header { value, pos } => {
                let rest = value.as_bytes().get(*pos..).filter(|r| !r.is_empty())?;
                let end = rest.iter().position(|b| *b == b',').unwrap_or(rest.len());
                *pos += end + 1;
                let item = rest.get(..end).unwrap_or_default().trim_ascii();
                Some(std::str::from_utf8(item).ok().and_then(|t| t.parse().ok()))
            }
        }
    }
}

impl Iterator for Upstreams {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        if usize::from(self.first.is_some()) + self.more.len() >= self.max {
            return None;
        }
        loop {
            let Some(addr) = self.candidate()? else { continue };
            if self.first == Some(addr) || self.more.contains(&addr) {
                continue;
            }
            match self.first {
                None => self.first = Some(addr),
                Some(_) => self.more.push(addr),
            }
            return Some(addr);
        }
    }
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

        let mut h = HeaderMap::new();
        h.insert("connection", "Close, X-Secret".parse().unwrap());
        h.append("connection", "TE".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("content-length", "3".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-length"]);

        let mut h = HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "nothing hop-by-hop: untouched");
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

    fn listed(v: &str, max: usize) -> Vec<SocketAddr> {
        Upstreams::listed(HeaderValue::from_str(v).unwrap(), max).collect()
    }

    #[test]
    fn upstream_list_is_distinct_ordered_and_bounded() {
        let got = listed("127.0.0.1:1, junk,127.0.0.1:2,127.0.0.1:1, [::1]:3, 127.0.0.1:4", 3);
        let want: Vec<SocketAddr> =
            vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), "[::1]:3".parse().unwrap()];
        assert_eq!(got, want);
        assert!(listed("", 3).is_empty());
        assert!(listed(",,junk,", 3).is_empty());
        assert_eq!(listed("127.0.0.1:1,127.0.0.1:1", 3).len(), 1);
        assert_eq!(listed("127.0.0.1:1,127.0.0.1:2", 1).len(), 1);
        let fixed: Vec<SocketAddr> = vec!["127.0.0.1:7".parse().unwrap(), "127.0.0.1:8".parse().unwrap()];
        assert_eq!(Upstreams::fixed(fixed.clone(), 1).collect::<Vec<_>>(), fixed[..1]);
        assert_eq!(Upstreams::fixed(fixed.clone(), 3).collect::<Vec<_>>(), fixed);
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_stays_distinct_and_bounded(v in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(value) = HeaderValue::from_bytes(&v) {
                let got: Vec<SocketAddr> = Upstreams::listed(value, 3).collect();
                prop_assert!(got.len() <= 3);
                for (i, a) in got.iter().enumerate() {
                    prop_assert!(!got[..i].contains(a));
                }
            }
        }

        #[test]
        fn addresses_come_back_in_order(ports in proptest::collection::vec(1u16..5, 0..8)) {
            let text: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            let got = listed(&text.join(","), 10);
            let mut want: Vec<SocketAddr> = vec![];
            for p in &ports {
                let a: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
                if !want.contains(&a) {
                    want.push(a);
                }
            }
            prop_assert_eq!(got, want);
        }
    }
}
