//! Who may call what: the token (compared in constant time), or without one a loopback `Host` and no other site's
//! page; applied by one layer over every route ([`guard`]), so that a handler cannot be added unprotected.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::errors::ApiError;
use crate::app::{App, AppState};

pub fn authorized(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &app.config.token else { return local_host(headers) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <token>` is required",
            None,
        ))
    }
}

/// Paths anyone who reaches the port may read: the dashboard page (its data needs the token), probes, the API's own
/// description.
pub const PUBLIC_READS: [&str; 4] = ["/", "/livez", "/readyz", "/openapi.json"];
/// Calls open without the token: Envoy's REST EDS, which cannot send one and carries addresses only (docs/security.md).
pub const OPEN_CALLS: [(&str, &str); 1] = [("POST", "/v3/discovery:endpoints")];

/// Whether a call needs the token (or, without one configured, a loopback `Host`): every call that changes state,
/// the endpoint table (it carries the sticky secret and the hash seed), and every other read unless `public_reads`.
pub fn needs_auth(app: &App, method: &axum::http::Method, path: &str) -> bool {
    if OPEN_CALLS.iter().any(|(m, p)| m == method && *p == path) {
        return false;
    }
    if !matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD) {
        return true;
    }
    let table = path.starts_with("/v1/services/") && path.ends_with("/endpoints");
    !PUBLIC_READS.contains(&path) && (table || !app.config.public_reads)
}

/// The one place calls are authorized: a layer over every route, so a handler cannot be added unprotected by
/// forgetting a check.
pub async fn guard(
    State(app): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if needs_auth(&app, request.method(), request.uri().path())
        && let Err(e) = authorized(&app, request.headers())
    {
        return e.into_response();
    }
    next.run(request).await
}

/// Whether a `Host` or an origin's host names this machine's loopback.
pub fn is_loopback_name(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Without a token the supervisor listens on loopback only, and takes a call only from this machine's own pages or
/// from clients that are not browsers:
/// - `Host` must be a loopback name: a page that rebinds its own DNS name to 127.0.0.1 sends its own name;
/// - a browser's cross-site request is refused: `Sec-Fetch-Site: cross-site`, or an `Origin` that is not a loopback
///   one (`null` included). A page elsewhere could otherwise post a form to 127.0.0.1 and drain an instance (it cannot
///   read the answer, but the change is made). curl and the proxies send neither header.
pub fn local_host(headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    if !is_loopback_name(text(header::HOST).unwrap_or_default()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "without a token, the API answers only a loopback `Host` (127.0.0.1, [::1], localhost)",
            None,
        ));
    }
    let cross_site = text(header::HeaderName::from_static("sec-fetch-site")) == Some("cross-site");
    let foreign_origin = text(header::ORIGIN).is_some_and(|o| {
        let host = o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")).unwrap_or("");
        !is_loopback_name(host)
    });
    if cross_site || foreign_origin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "without a token, calls from another site's page are refused",
            None,
        ));
    }
    Ok(())
}
