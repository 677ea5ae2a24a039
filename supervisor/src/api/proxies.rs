//! What the proxies call: the endpoint table, Envoy's EDS, reports; and the event stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::body::Body;
use super::doc;
use super::errors::{ApiError, ErrorBody};
use crate::app::{AppState, now_ms};
use crate::events::Event;
use crate::registry::RegistryError;
use crate::reports::Report;
use crate::table;

/// The endpoint table for the proxies (the filter's wire format), with `ETag`; `If-None-Match` gives 304.
#[utoipa::path(get, path = "/v1/services/{service}/endpoints", params(("service" = String, Path)),
    responses((status = 200, body = Object), (status = 304), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn endpoints(
    State(app): State<AppState>,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let proxy_zones = app.reports().proxy_zones(&service, now_ms());
    let reg = app.registry();
    let svc = reg.service(&service)?;
    let etag = table::etag(svc, &proxy_zones);
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let seed = reg.secret.as_ref().map(|s| s.hash_seed(&service));
    let body = table::endpoints(svc, seed.as_deref(), proxy_zones).to_string();
    Ok(([(header::ETAG, etag), (header::CONTENT_TYPE, "application/json".into())], body).into_response())
}

/// Envoy's REST `DiscoveryRequest`, as far as the supervisor reads it (Envoy sends more: `node`, ...).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct DiscoveryRequest {
    #[serde(default)]
    version_info: String,
    #[serde(default)]
    resource_names: Vec<String>,
}

/// Envoy's REST EDS: answers a `DiscoveryRequest` for `ClusterLoadAssignment`s. The cluster named in
/// `resource_names` is the service of the same name, or the only service when there is one.
#[utoipa::path(post, path = "/v3/discovery:endpoints", request_body = DiscoveryRequest,
    responses((status = 200, body = Object), (status = 304), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn eds(State(app): State<AppState>, Body(req): Body<DiscoveryRequest>) -> Result<Response, ApiError> {
    let cluster = req.resource_names.first().cloned().unwrap_or_else(|| "backend".into());
    let reg = app.registry();
    let svc = match reg.services.get(&cluster) {
        Some(s) => s,
        None if reg.services.len() == 1 => {
            reg.services.values().next().ok_or_else(|| RegistryError::NoService(cluster.clone()))?
        }
        None => return Err(RegistryError::NoService(cluster).into()),
    };
    if req.version_info == svc.version.to_string() {
        return Ok(StatusCode::NOT_MODIFIED.into_response());
    }
    Ok(axum::Json(table::eds(svc, &cluster)).into_response())
}

/// Takes a proxy's per-endpoint aggregates.
#[utoipa::path(post, path = "/v1/reports", request_body = Report,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, description = "a body above the API's size limit"), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn reports(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Body<Report>, ApiError>,
) -> Result<StatusCode, ApiError> {
    let Body(mut report) = body.inspect_err(|_| app.metrics.report_refused())?;
    if let Err(e) = report.validate() {
        app.metrics.report_refused();
        tracing::warn!(proxy = %report.proxy, field = %e.key, reason = %e.reason, "report refused");
        return Err(e.into());
    }
    // with several supervisors, the leader's autoscaler and drains need every proxy's figures: a follower passes
    // them on (once: a forwarded report is never forwarded again)
    if app.leadership.is_elected()
        && !app.leadership.is_leader()
        && !headers.contains_key(FORWARDED_HEADER)
        && let Some(leader) = app.leadership.leader_url()
    {
        tokio::spawn(forward(leader, app.config.token.clone(), report.clone()));
    }
    // only the service's instances are kept: a report cannot grow the supervisor's memory with made-up ids
    let before = report.endpoints.len();
    {
        let reg = app.registry();
        match reg.service(&report.service) {
            Ok(svc) => retain_known(&mut report.endpoints, &svc.instances),
            Err(_) => report.endpoints.clear(),
        }
    }
    app.metrics.report_unknown_endpoints(before - report.endpoints.len());
    app.reports().record(&report, now_ms());
    app.metrics.report();
    Ok(StatusCode::NO_CONTENT)
}

/// Keeps the endpoints the service has. A proxy lists them in its table's order, sorted by id like the registry, so
/// the two lists are walked side by side (a report about 1,000 instances costs 1,000 comparisons, not 10,000); a list
/// in any other order is looked up one by one.
fn retain_known<V>(endpoints: &mut Vec<crate::reports::EndpointReport>, known: &std::collections::BTreeMap<String, V>) {
    if endpoints.is_sorted_by(|a, b| a.id < b.id) {
        let mut ids = known.keys().peekable();
        endpoints.retain(|e| {
            while ids.next_if(|k| k.as_str() < e.id.as_str()).is_some() {}
            ids.peek().is_some_and(|k| **k == e.id)
        });
    } else {
        endpoints.retain(|e| known.contains_key(&e.id));
    }
}

/// Marks a report a follower passed on to the leader.
const FORWARDED_HEADER: &str = "x-equilibrio-forwarded";

/// Passes a proxy's report on to the leader (best effort: the next one follows a second later).
async fn forward(leader: String, token: Option<String>, report: Report) {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client =
        CLIENT.get_or_init(|| reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap_or_default());
    let Ok(body) = serde_json::to_vec(&report) else { return };
    let mut request = client
        .post(format!("{leader}/v1/reports"))
        .header(FORWARDED_HEADER, "1")
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::debug!(%leader, status = %r.status(), "report not taken by the leader"),
        Err(e) => tracing::debug!(%leader, error = %e, "report not forwarded to the leader"),
    }
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    pub service: Option<String>,
}

/// Server-sent events: the recent history, then every new event as it happens.
#[utoipa::path(get, path = "/v1/events", params(("service" = Option<String>, Query, description = "only this service")),
    responses((status = 200, content_type = "text/event-stream", body = doc::SseFrame), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(app): State<AppState>,
    Query(q): Query<EventsQuery>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let live = BroadcastStream::new(app.events.subscribe());
    let history = app.events.history(q.service.as_deref());
    let filter = q.service.clone();
    let to_sse = |e: &Event| SseEvent::default().event("event").json_data(e).unwrap_or_else(|_| SseEvent::default());
    let past = tokio_stream::iter(history.iter().map(to_sse).map(Ok).collect::<Vec<_>>());
    let live = live.filter_map(move |item| match item {
        Ok(e) if filter.as_ref().is_none_or(|s| *s == e.service) => Some(Ok(to_sse(&e))),
        Ok(_) => None,
        Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
            Some(Ok(SseEvent::default().event("lagged").data(n.to_string())))
        }
    });
    Sse::new(past.chain(live)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::EndpointReport;

    fn endpoints(ids: &[&str]) -> Vec<EndpointReport> {
        ids.iter()
            .map(|id| EndpointReport {
                id: id.to_string(),
                requests: 1,
                errors: 0,
                latency_sum_ms: 1.0,
                latency_p95_ms: 1.0,
                in_flight: 0,
                ejected: false,
            })
            .collect()
    }

    #[test]
    fn only_known_endpoints_are_kept_in_any_order() {
        let known: std::collections::BTreeMap<String, ()> =
            ["a", "b", "d", "f"].iter().map(|k| (k.to_string(), ())).collect();
        let ids = |e: &[EndpointReport]| e.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        // sorted, as proxies send them
        let mut sorted = endpoints(&["0", "a", "c", "d", "e", "f", "g"]);
        retain_known(&mut sorted, &known);
        assert_eq!(ids(&sorted), ["a", "d", "f"]);
        // any other order, duplicates included
        let mut shuffled = endpoints(&["f", "x", "a", "a", "c"]);
        retain_known(&mut shuffled, &known);
        assert_eq!(ids(&shuffled), ["f", "a", "a"]);
        let mut none = endpoints(&["x", "y"]);
        retain_known(&mut none, &known);
        assert!(none.is_empty());
    }
}
