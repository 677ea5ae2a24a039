//! What the filter reads of a request, and the keys derived from it: the client address (with X-Forwarded-For trust)
//! and the value a hash or rate-limit key names. Reads are lazy: only the headers a decision needs are fetched from
//! the proxy (each is a host call).

use crate::client::client_ip;
use crate::config::KeySource;
use crate::cookie;

/// What the engine needs to know about a request.
pub trait RequestView {
    /// A request header by lower-case name (`:path` for the path with its query).
    fn header(&self, name: &str) -> Option<String>;
    /// The peer address, `ip:port`.
    fn peer(&self) -> Option<String>;
}

/// The client's address (the peer, or the trusted X-Forwarded-For entry `hops` from the right).
pub fn client_of(req: &dyn RequestView, hops: u32) -> String {
    let peer = req.peer().unwrap_or_default();
    let xff = if hops > 0 { req.header("x-forwarded-for") } else { None };
    client_ip(&peer, xff.as_deref(), hops).to_string()
}

/// The value `source` names in the request, if it has one.
pub fn key_of(req: &dyn RequestView, source: &KeySource, hops: u32) -> Option<String> {
    match source {
        KeySource::ClientAddress => Some(client_of(req, hops)),
        KeySource::Header(name) => req.header(name),
        KeySource::Cookie(name) => {
            req.header("cookie").and_then(|h| cookie::values(&h, name).next().map(str::to_string))
        }
        KeySource::Path => req.header(":path").map(|p| p.split('?').next().unwrap_or_default().to_string()),
        KeySource::Query(name) => req.header(":path").and_then(|p| query_param(&p, name)),
    }
}

/// The raw value of a query parameter (not percent-decoded: the key only has to be stable).
fn query_param(path: &str, name: &str) -> Option<String> {
    let (_, query) = path.split_once('?')?;
    let query = query.split('#').next().unwrap_or_default();
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_by_exact_name() {
        assert_eq!(query_param("/s?q=shoes&page=2", "q").as_deref(), Some("shoes"));
        assert_eq!(query_param("/s?qq=1&q=2#frag", "q").as_deref(), Some("2"));
        assert_eq!(query_param("/s?flag", "flag").as_deref(), Some(""));
        assert_eq!(query_param("/s", "q"), None);
    }
}
