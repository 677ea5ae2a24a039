//! Request-aware routes, compiled for a worker: which route a request takes (the first whose conditions all hold), and
//! the policy and pool that route gives it (`equilibrio_contract::route` has the wire format and the validation).
//!
//! Matching reads only what some route asks about, each at most once per request (every header read is a host call):
//! a service without routes reads nothing more than before.

use crate::config::Policy;
use crate::request::RequestView;
use crate::table::Endpoint;
use equilibrio_contract::route::{self, PathMatch, Pool, Route, ValueMatch};

/// A route, ready to match.
#[derive(Debug, Clone)]
struct Compiled {
    path: Option<Path>,
    methods: Vec<String>,
    headers: Vec<ValueMatch>,
    query: Vec<ValueMatch>,
}

#[derive(Debug, Clone)]
enum Path {
    Prefix(String),
    Exact(String),
    Regex(regex_lite::Regex),
    /// A regex that does not compile (validation refuses it first): the route never matches.
    Never,
}

/// The routes of a policy, in order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Compiled>,
    reads_path: bool,
    reads_method: bool,
}

impl Routes {
    pub fn compile(routes: &[Route]) -> Routes {
        let routes: Vec<Compiled> = routes
            .iter()
            .map(|r| Compiled {
                path: r.matcher.path.as_ref().map(|p| match p {
                    PathMatch::Prefix(s) => Path::Prefix(s.clone()),
                    PathMatch::Exact(s) => Path::Exact(s.clone()),
                    PathMatch::Regex(re) => route::compile(re).map_or(Path::Never, Path::Regex),
                }),
                methods: r.matcher.methods.clone(),
                headers: r.matcher.headers.clone(),
                query: r.matcher.query.clone(),
            })
            .collect();
        let reads_path = routes.iter().any(|r| r.path.is_some() || !r.query.is_empty());
        let reads_method = routes.iter().any(|r| !r.methods.is_empty());
        Routes { routes, reads_path, reads_method }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The index of the first route `req` matches.
    pub fn pick(&self, req: &dyn RequestView) -> Option<usize> {
        if self.routes.is_empty() {
            return None;
        }
        let full_path = if self.reads_path { req.header(":path") } else { None };
        let (path, query) = match full_path.as_deref() {
            Some(p) => {
                let p = p.split('#').next().unwrap_or_default();
                p.split_once('?').map_or((p, None), |(path, q)| (path, Some(q)))
            }
            None => ("", None),
        };
        let method = if self.reads_method { req.header(":method") } else { None };
        self.routes.iter().position(|r| {
            let path_ok = match &r.path {
                None => true,
                Some(Path::Prefix(p)) => path.starts_with(p.as_str()),
                Some(Path::Exact(p)) => path == p,
                Some(Path::Regex(re)) => re.is_match(path),
                Some(Path::Never) => false,
            };
            path_ok
                && (r.methods.is_empty() || method.as_deref().is_some_and(|m| r.methods.iter().any(|x| x == m)))
                && r.headers.iter().all(|h| value_ok(req.header(&h.name).as_deref(), h.value.as_deref()))
                && r.query.iter().all(|q| value_ok(query.and_then(|qs| param(qs, &q.name)), q.value.as_deref()))
        })
    }
}

/// Present, and equal to `want` if one is given.
fn value_ok(got: Option<&str>, want: Option<&str>) -> bool {
    match (got, want) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(g), Some(w)) => g == w,
    }
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The policy a route's requests get: the service's, with the route's overrides.
pub fn policy(service: &Policy, r: &Route) -> Policy {
    let mut p = service.clone();
    p.routes = Vec::new();
    if let Some(a) = r.algorithm {
        p.algorithm = a;
    }
    if let Some(ch) = &r.consistent_hash {
        p.consistent_hash = ch.clone();
    }
    if let Some(s) = &r.sticky_sessions {
        p.sticky_sessions.enabled = s.enabled && p.sticky_sessions.secret.is_some();
    }
    if let Some(rl) = &r.rate_limiting {
        p.rate_limiting.enabled = rl.enabled;
        p.rate_limiting.requests_per_minute = rl.requests_per_minute;
        p.rate_limiting.burst_size = rl.burst_size;
    }
    p
}

/// Which endpoints a route's pool holds (their tags include every tag of the pool); `None` for a pool of all.
pub fn pool(endpoints: &[Endpoint], pool: &Pool) -> Option<Vec<bool>> {
    if pool.tags.is_empty() {
        return None;
    }
    Some(endpoints.iter().map(|e| pool.tags.iter().all(|t| e.tags.contains(t))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct Req(HashMap<&'static str, &'static str>);
    impl RequestView for Req {
        fn header(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
        fn peer(&self) -> Option<String> {
            None
        }
    }
    fn req(pairs: &[(&'static str, &'static str)]) -> Req {
        Req(pairs.iter().copied().collect())
    }

    fn routes() -> Routes {
        let p = Policy::parse(&json!({"routes": [
            {"name": "search", "match": {"path": {"prefix": "/search"}, "methods": ["GET", "HEAD"]}},
            {"name": "item", "match": {"path": {"regex": "/item/[0-9]+"}, "query": [{"name": "v", "value": "2"}]}},
            {"name": "beta", "match": {"headers": [{"name": "x-beta"}]}},
            {"name": "exact", "match": {"path": {"exact": "/recommend"}, "query": [{"name": "user"}]}}
        ]}))
        .unwrap();
        Routes::compile(&p.routes)
    }

    #[test]
    fn the_first_route_whose_conditions_all_hold_wins() {
        let r = routes();
        assert_eq!(r.pick(&req(&[(":path", "/search?q=shoes"), (":method", "GET")])), Some(0));
        assert_eq!(r.pick(&req(&[(":path", "/search?q=shoes"), (":method", "POST")])), None, "method");
        assert_eq!(r.pick(&req(&[(":path", "/search"), (":method", "POST"), ("x-beta", "1")])), Some(2));
        assert_eq!(r.pick(&req(&[(":path", "/item/42?v=2"), (":method", "GET")])), Some(1));
        assert_eq!(r.pick(&req(&[(":path", "/item/42?v=3"), (":method", "GET")])), None, "query value");
        assert_eq!(r.pick(&req(&[(":path", "/item/42x?v=2"), (":method", "GET")])), None, "anchored regex");
        assert_eq!(r.pick(&req(&[(":path", "/recommend?user=7"), (":method", "GET")])), Some(3));
        assert_eq!(r.pick(&req(&[(":path", "/recommend/x?user=7"), (":method", "GET")])), None, "exact path");
        assert_eq!(r.pick(&req(&[(":path", "/recommend"), (":method", "GET")])), None, "query present");
    }

    #[test]
    fn without_routes_nothing_is_read() {
        struct Panics;
        impl RequestView for Panics {
            fn header(&self, name: &str) -> Option<String> {
                panic!("read {name}")
            }
            fn peer(&self) -> Option<String> {
                panic!("read the peer")
            }
        }
        assert_eq!(Routes::compile(&[]).pick(&Panics), None);
    }

    #[test]
    fn a_route_overrides_only_what_it_names() {
        let service = Policy::parse(&json!({"algorithm": "least_connections", "routes": [
            {"name": "w", "algorithm": "consistent_hash", "rate_limiting": {"requests_per_minute": 60, "burst_size": 5}}
        ]}))
        .unwrap();
        let p = policy(&service, &service.routes[0]);
        assert_eq!(p.algorithm, crate::config::Algorithm::ConsistentHash);
        assert!(p.rate_limiting.enabled && p.rate_limiting.burst_size == 5);
        assert_eq!(p.passive_health, service.passive_health);
        assert!(p.routes.is_empty());
    }
}
