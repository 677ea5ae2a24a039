//! The REST API: management for operators, tables for the proxies, reports from them, health and metrics.
//!
//! Every call that changes state needs `Authorization: Bearer <token>` (compared in constant time) when a token is
//! configured; so does the endpoint table, which carries the sticky-session secret. Errors are JSON
//! `{"error": {"code", "message", "field"}}`. Request bodies are parsed here (not by an extractor) so that a bad field
//! is named in the error. The OpenAPI document at `/openapi.json` is generated from these handlers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::stream::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::{OpenApi, ToSchema};

use crate::app::{App, now_ms};
use crate::config::{HealthCheck, InstanceSpec, validate_health, validate_policy};
use crate::events::Event;
use crate::metrics::InstanceSample;
use crate::persist::PersistError;
use crate::registry::{Instance, InstanceUpdate, RegistryError, Source};
use crate::reports::{Report, Traffic};
use crate::table;

type AppState = Arc<App>;

/// Largest request body accepted (Envoy's EDS request carries its whole node description: about 80 KB).
pub const MAX_BODY: usize = 1 << 20;

// ------------------------------------------------------------------------------------------------ errors

/// The error body: `{"error": {"code", "message", "field"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>, field: Option<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field }
    }
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message, Some(field.into()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message, field: self.field } };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let (status, code) = match &e {
            RegistryError::NoService(_) | RegistryError::NoInstance(..) => (StatusCode::NOT_FOUND, "not_found"),
            RegistryError::Exists(_) => (StatusCode::CONFLICT, "conflict"),
            RegistryError::AddressTaken(..) => (StatusCode::CONFLICT, "conflict"),
            RegistryError::Full { .. } => (StatusCode::CONFLICT, "service_full"),
        };
        let field = match &e {
            RegistryError::Exists(_) => Some("id".to_string()),
            RegistryError::AddressTaken(..) => Some("address".to_string()),
            _ => None,
        };
        ApiError::new(status, code, e.to_string(), field)
    }
}

impl From<PersistError> for ApiError {
    fn from(e: PersistError) -> Self {
        tracing::error!(error = %e, "state file");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "state_not_saved", e.to_string(), None)
    }
}

/// Parses a JSON body, naming the offending field on error.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // every body is an object (serde would also take a struct's fields as an array: `[null, null]`)
    if let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace())
        && *first != b'{'
    {
        let message = "the body must be a JSON object";
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message, None));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = Some(equilibrio_filter::config::error_key(&path, &inner.to_string())).filter(|k| !k.is_empty());
        let status = if inner.is_syntax() || inner.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        let code = if status == StatusCode::BAD_REQUEST { "invalid_json" } else { "invalid_value" };
        ApiError::new(status, code, inner.to_string(), field)
    })
}

// ------------------------------------------------------------------------------------------------ auth

fn authorized(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
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
const PUBLIC_READS: [&str; 4] = ["/", "/livez", "/readyz", "/openapi.json"];
/// Calls open without the token: Envoy's REST EDS, which cannot send one and carries addresses only (docs/security.md).
const OPEN_CALLS: [(&str, &str); 1] = [("POST", "/v3/discovery:endpoints")];

/// Whether a call needs the token (or, without one configured, a loopback `Host`): every call that changes state,
/// the endpoint table (it carries the sticky secret and the hash seed), and every other read unless `public_reads`.
fn needs_auth(app: &App, method: &axum::http::Method, path: &str) -> bool {
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
async fn guard(State(app): State<AppState>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if needs_auth(&app, request.method(), request.uri().path())
        && let Err(e) = authorized(&app, request.headers())
    {
        return e.into_response();
    }
    next.run(request).await
}

/// A panic in one request's handler costs that request a 500, not the process (release builds unwind): counted in
/// `handler_panics` and logged with the request line.
async fn contain_panics(
    State(app): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use futures_util::FutureExt;
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    match std::panic::AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            app.metrics.handler_panics.inc();
            tracing::error!(%method, %path, panic = %what, "a request handler panicked; answered 500");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the supervisor failed on this request (logged); nothing else is affected",
                None,
            )
            .into_response()
        }
    }
}

/// Test-only fault injection (`EQUILIBRIO_FAULT_INJECTION=1` in the environment, never in production): a request
/// carrying `x-equilibrio-fault: panic` panics in its handler, to show that one panic costs only that request.
async fn inject_faults(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.headers().get("x-equilibrio-fault").is_some_and(|v| v == "panic") {
        #[allow(clippy::panic)] // the one deliberate panic: what this layer exists for
        {
            panic!("fault injected by x-equilibrio-fault");
        }
    }
    next.run(request).await
}

/// Whether a `Host` or an origin's host names this machine's loopback.
fn is_loopback_name(host: &str) -> bool {
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
fn local_host(headers: &HeaderMap) -> Result<(), ApiError> {
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

// ------------------------------------------------------------------------------------------------ views

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceSummary {
    pub name: String,
    pub version: u64,
    pub instances: usize,
    pub healthy: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceView {
    #[serde(flatten)]
    pub instance: Instance,
    /// What the proxies see: healthy, draining or unhealthy.
    pub state: String,
    pub traffic: Traffic,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub version: u64,
    /// The balancing policy (secret redacted).
    #[schema(value_type = Object)]
    pub policy: Value,
    pub health_check: HealthCheck,
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostInfo {
    pub environment: crate::config::Environment,
    pub cpu_cores: usize,
    pub memory_bytes: u64,
    pub services: Vec<ServiceSummary>,
}

fn instance_view(app: &App, service: &str, inst: &Instance, now: u64) -> InstanceView {
    InstanceView {
        instance: inst.clone(),
        state: inst.table_state().to_string(),
        traffic: app.reports().traffic(service, &inst.spec.id, now),
    }
}

// ------------------------------------------------------------------------------------------------ handlers

/// The dashboard: services, instances, traffic, scaling and events, live (SSE). One file, served by the binary.
#[utoipa::path(get, path = "/", responses((status = 200, description = "text/html")))]
async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("dashboard.html")).into_response()
}

/// The process is alive.
#[utoipa::path(get, path = "/livez", responses((status = 200, description = "alive")))]
async fn livez() -> &'static str {
    "ok"
}

/// Ready for traffic (fails during shutdown).
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, description = "not ready: shutting down, or Docker unreachable while a service is auto-scaled")))]
async fn readyz(State(app): State<AppState>) -> Response {
    if app.is_ready() {
        "ok".into_response()
    } else {
        let why =
            if app.ready.load(std::sync::atomic::Ordering::SeqCst) { "docker unreachable" } else { "shutting down" };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition"),
    (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn metrics(State(app): State<AppState>) -> Response {
    let now = now_ms();
    let samples: Vec<InstanceSample> = {
        let reg = app.registry();
        let reports = app.reports();
        reg.services
            .values()
            .flat_map(|svc| {
                svc.instances.values().map(|i| {
                    let t = reports.traffic(&svc.name, &i.spec.id, now);
                    InstanceSample {
                        service: svc.name.clone(),
                        instance: i.spec.id.clone(),
                        state: i.table_state(),
                        requests_per_second: t.requests_per_second,
                        error_rate: t.error_rate,
                        in_flight: t.in_flight,
                        latency_p95_seconds: t.latency_p95_ms / 1000.0,
                    }
                })
            })
            .collect()
    };
    let scaling: Vec<crate::metrics::ScalingSample> = {
        let reg = app.registry();
        let states = app.scaling();
        states
            .iter()
            .map(|(name, st)| {
                let price =
                    reg.services.get(name).and_then(|s| s.scaling.as_ref()).map_or(0.0, |p| p.price_per_instance_hour);
                crate::metrics::ScalingSample {
                    service: name.clone(),
                    current: st.current,
                    desired: st.desired,
                    cpu_avg: st.cost.cpu_percent_avg,
                    cpu_peak: st.cost.cpu_percent_peak,
                    memory_avg: st.cost.memory_percent_avg,
                    memory_peak: st.cost.memory_percent_peak,
                    cost_per_request: st.cost.cost_per_request(price),
                    efficiency: st.cost.efficiency(),
                }
            })
            .collect()
    };
    let body = app.metrics.render(&samples, &scaling);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

/// The supervisor's host (cores, memory) and its services.
#[utoipa::path(get, path = "/v1/services", responses((status = 200, body = HostInfo), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_services(State(app): State<AppState>) -> axum::Json<HostInfo> {
    let services = app
        .registry()
        .services
        .values()
        .map(|s| ServiceSummary {
            name: s.name.clone(),
            version: s.version,
            instances: s.instances.len(),
            healthy: s.instances.values().filter(|i| i.table_state() == "healthy").count(),
        })
        .collect();
    let memory_bytes = sysinfo::System::new().map_or(0, |mut sys| {
        sys.refresh_memory();
        sys.total_memory()
    });
    let cpu_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    axum::Json(HostInfo { environment: app.config.environment, cpu_cores, memory_bytes, services })
}

/// One service: policy, health-check settings, instances with their traffic.
#[utoipa::path(get, path = "/v1/services/{service}", params(("service" = String, Path)),
    responses((status = 200, body = ServiceView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_service(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<ServiceView>, ApiError> {
    let now = now_ms();
    let svc = app.registry().service(&service)?.clone();
    Ok(axum::Json(ServiceView {
        name: svc.name.clone(),
        version: svc.version,
        policy: table::redact(&svc.policy),
        health_check: svc.health_check.clone(),
        instances: svc.instances.values().map(|i| instance_view(&app, &service, i, now)).collect(),
    }))
}

/// The instances of a service.
#[utoipa::path(get, path = "/v1/services/{service}/instances", params(("service" = String, Path)),
    responses((status = 200, body = [InstanceView]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_instances(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<Vec<InstanceView>>, ApiError> {
    let now = now_ms();
    let svc = app.registry().service(&service)?.clone();
    Ok(axum::Json(svc.instances.values().map(|i| instance_view(&app, &service, i, now)).collect()))
}

/// A registration: the instance and an optional heartbeat TTL (seconds or "500ms"...).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    #[serde(flatten)]
    pub instance: InstanceSpec,
    /// Without a heartbeat within this time the instance is removed.
    #[schema(value_type = Option<doc::Duration>)]
    pub heartbeat_ttl: Option<equilibrio_filter::config::Millis>,
}

/// Registers an instance.
#[utoipa::path(post, path = "/v1/services/{service}/instances", params(("service" = String, Path)), request_body = doc::Registration,
    responses((status = 201, body = InstanceView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
async fn register(State(app): State<AppState>, Path(service): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    // flatten and deny_unknown_fields do not mix in serde: check the keys by hand
    let raw: Value = parse(&body)?;
    if let Some(obj) = raw.as_object() {
        const KNOWN: [&str; 8] =
            ["id", "address", "weight", "zone", "tags", "version", "capabilities", "heartbeat_ttl"];
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ApiError::invalid(k.clone(), format!("unknown field `{k}`")));
        }
    }
    let mut spec: InstanceSpec = parse(&serde_json::to_vec(&without(&raw, "heartbeat_ttl")).unwrap_or_default())?;
    let ttl = match raw.get("heartbeat_ttl") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            equilibrio_filter::config::parse_duration(v)
                .ok()
                .filter(|ms| (1000..=86_400_000).contains(ms))
                .ok_or_else(|| ApiError::invalid("heartbeat_ttl", "must be a duration between 1s and 24h"))?,
        ),
    };
    spec.validate().map_err(|(f, r)| ApiError::invalid(f, r))?;
    let id = spec.id.clone();
    app.change(|reg, now| {
        reg.register(&service, spec, Source::Api, ttl, now).map(|e| ((), e)).map_err(ApiError::from)
    })?;
    let now = now_ms();
    let view = {
        let reg = app.registry();
        let inst = reg.service(&service)?.instances.get(&id).cloned();
        inst.map(|i| instance_view(&app, &service, &i, now))
    };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

fn without(v: &Value, key: &str) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove(key);
    }
    v
}

/// Deregisters an instance.
#[utoipa::path(delete, path = "/v1/services/{service}/instances/{id}", params(("service" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn deregister(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.change(|reg, now| {
        reg.deregister(&service, &id, now, "deregistered through the API").map(|e| ((), e)).map_err(ApiError::from)
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes an instance's weight or zone.
#[utoipa::path(put, path = "/v1/services/{service}/instances/{id}", params(("service" = String, Path), ("id" = String, Path)),
    request_body = InstanceUpdate,
    responses((status = 200, body = InstanceView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn update_instance(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<axum::Json<InstanceView>, ApiError> {
    let u: InstanceUpdate = parse(&body)?;
    if let Some(w) = u.weight
        && w > equilibrio_filter::table::MAX_WEIGHT
    {
        return Err(ApiError::invalid("weight", format!("must be at most {}", equilibrio_filter::table::MAX_WEIGHT)));
    }
    if let Some(z) = &u.zone {
        crate::config::validate_zone(z).map_err(|r| ApiError::invalid("zone", r))?;
    }
    app.change(|reg, now| reg.update(&service, &id, &u, now).map(|e| ((), e)).map_err(ApiError::from))?;
    instance(&app, &service, &id)
}

fn instance(app: &App, service: &str, id: &str) -> Result<axum::Json<InstanceView>, ApiError> {
    let inst = app
        .registry()
        .service(service)?
        .instances
        .get(id)
        .cloned()
        .ok_or_else(|| RegistryError::NoInstance(service.into(), id.into()))?;
    Ok(axum::Json(instance_view(app, service, &inst, now_ms())))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Give up waiting for in-flight requests after this (default: the configured `drain_timeout`).
    #[schema(value_type = Option<doc::Duration>)]
    pub timeout: Option<equilibrio_filter::config::Millis>,
}

/// Drains an instance: no new traffic (its sticky sessions stay until they end); done when nothing is in flight.
#[utoipa::path(post, path = "/v1/services/{service}/instances/{id}/drain", params(("service" = String, Path), ("id" = String, Path)),
    request_body = Option<DrainRequest>,
    responses((status = 200, body = InstanceView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn drain(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<axum::Json<InstanceView>, ApiError> {
    let req: DrainRequest = if body.is_empty() { DrainRequest::default() } else { parse(&body)? };
    let timeout = req.timeout.map_or(app.config.drain_timeout_ms, |m| m.0);
    if !(100..=3_600_000).contains(&timeout) {
        return Err(ApiError::invalid("timeout", "must be between 100ms and 1h"));
    }
    app.change(|reg, now| reg.drain(&service, &id, timeout, now).map(|e| ((), e)).map_err(ApiError::from))?;
    instance(&app, &service, &id)
}

/// Renews a heartbeat-TTL registration.
#[utoipa::path(post, path = "/v1/services/{service}/instances/{id}/heartbeat", params(("service" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn heartbeat(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.registry().heartbeat(&service, &id, now_ms())?;
    Ok(StatusCode::NO_CONTENT)
}

/// The balancing policy (the sticky-session secret is redacted).
#[utoipa::path(get, path = "/v1/services/{service}/policy", params(("service" = String, Path)),
    responses((status = 200, body = Object), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_policy(State(app): State<AppState>, Path(service): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(table::redact(&app.registry().service(&service)?.policy)))
}

/// Replaces the balancing policy (`algorithm`, `consistent_hash`, `sticky_sessions`, `rate_limiting`,
/// `passive_health`, `observation`), validated as the filter validates it. A `secret` of `<redacted>` keeps the
/// current secret.
#[utoipa::path(put, path = "/v1/services/{service}/policy", params(("service" = String, Path)), request_body = doc::PolicyUpdate,
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn put_policy(
    State(app): State<AppState>,
    Path(service): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let mut policy: Value = parse(&body)?;
    let Some(obj) = policy.as_object() else { return Err(ApiError::invalid("", "expected a JSON object")) };
    const KEYS: &[&str] = &equilibrio_filter::config::POLICY_KEYS;
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::invalid(k.clone(), format!("unknown field `{k}`: expected one of {}", KEYS.join(", "))));
    }
    // a client that read the redacted policy and sends it back keeps the secret it cannot see
    if policy.pointer("/sticky_sessions/secret").and_then(Value::as_str) == Some("<redacted>") {
        let current = app.registry().service(&service)?.policy.pointer("/sticky_sessions/secret").cloned();
        if let Some(slot) = policy.pointer_mut("/sticky_sessions/secret") {
            *slot = current.unwrap_or(Value::Null);
        }
    }
    validate_policy(&service, &policy).map_err(|e| {
        let field = e.key.strip_prefix("policy.").unwrap_or(&e.key).to_string();
        ApiError::invalid(field, e.reason)
    })?;
    app.change(|reg, now| reg.set_policy(&service, policy.clone(), now).map(|e| ((), e)).map_err(ApiError::from))?;
    Ok(axum::Json(table::redact(&policy)))
}

/// Health-check settings as the API takes them (durations in seconds or with a unit).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckUpdate {
    /// At least the timeout.
    #[schema(value_type = Option<doc::Duration>)]
    pub interval: Option<equilibrio_filter::config::Millis>,
    #[schema(value_type = Option<doc::Duration>)]
    pub timeout: Option<equilibrio_filter::config::Millis>,
    #[schema(minimum = 1, maximum = 100)]
    pub retries: Option<u32>,
    #[schema(minimum = 1, maximum = 100)]
    pub rise: Option<u32>,
    /// A path: `/`, then no space or control character.
    #[schema(pattern = "^/[^\\u0000-\\u0020\\u007f]*$")]
    pub endpoint: Option<String>,
}

/// The health-check settings.
#[utoipa::path(get, path = "/v1/services/{service}/health_check", params(("service" = String, Path)),
    responses((status = 200, body = HealthCheck), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_health_check(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<HealthCheck>, ApiError> {
    Ok(axum::Json(app.registry().service(&service)?.health_check.clone()))
}

/// Changes health-check settings (the keys given; the others stay).
#[utoipa::path(put, path = "/v1/services/{service}/health_check", params(("service" = String, Path)), request_body = HealthCheckUpdate,
    responses((status = 200, body = HealthCheck), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn put_health_check(
    State(app): State<AppState>,
    Path(service): Path<String>,
    body: Bytes,
) -> Result<axum::Json<HealthCheck>, ApiError> {
    let u: HealthCheckUpdate = parse(&body)?;
    let mut h = app.registry().service(&service)?.health_check.clone();
    if let Some(v) = u.interval {
        h.interval_ms = v.0;
    }
    if let Some(v) = u.timeout {
        h.timeout_ms = v.0;
    }
    if let Some(v) = u.retries {
        h.retries = v;
    }
    if let Some(v) = u.rise {
        h.rise = v;
    }
    if let Some(v) = u.endpoint {
        h.endpoint = v;
    }
    validate_health(&h).map_err(|(f, r)| ApiError::invalid(f, r))?;
    app.change(|reg, now| reg.set_health_check(&service, h.clone(), now).map(|e| ((), e)).map_err(ApiError::from))?;
    Ok(axum::Json(h))
}

/// The endpoint table for the proxies (the filter's wire format), with `ETag`; `If-None-Match` gives 304.
#[utoipa::path(get, path = "/v1/services/{service}/endpoints", params(("service" = String, Path)),
    responses((status = 200, body = Object), (status = 304), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn endpoints(
    State(app): State<AppState>,
    Path(service): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let reg = app.registry();
    let svc = reg.service(&service)?;
    let etag = table::etag(svc);
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let seed = reg.secret.as_ref().map(|s| s.hash_seed(&service));
    let body = table::endpoints(svc, seed.as_deref()).to_string();
    Ok(([(header::ETAG, etag), (header::CONTENT_TYPE, "application/json".into())], body).into_response())
}

/// Envoy's REST EDS: answers a `DiscoveryRequest` for `ClusterLoadAssignment`s. The cluster named in
/// `resource_names` is the service of the same name, or the only service when there is one.
#[utoipa::path(post, path = "/v3/discovery:endpoints", request_body = doc::DiscoveryRequest,
    responses((status = 200, body = Object), (status = 304), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn eds(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    struct DiscoveryRequest {
        #[serde(default)]
        version_info: String,
        #[serde(default)]
        resource_names: Vec<String>,
    }
    let req: DiscoveryRequest = parse(&body)?;
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
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
async fn reports(State(app): State<AppState>, body: Bytes) -> Result<StatusCode, ApiError> {
    let mut report: Report = parse(&body).inspect_err(|_| app.metrics.report_refused())?;
    if let Err((field, reason)) = report.validate() {
        app.metrics.report_refused();
        tracing::warn!(proxy = %report.proxy, %field, %reason, "report refused");
        return Err(ApiError::invalid(field, reason));
    }
    // only the service's instances are kept: a report cannot grow the supervisor's memory with made-up ids
    let before = report.endpoints.len();
    {
        let reg = app.registry();
        let known = reg.service(&report.service).ok().map(|s| &s.instances);
        report.endpoints.retain(|e| known.is_some_and(|k| k.contains_key(&e.id)));
    }
    app.metrics.report_unknown_endpoints(before - report.endpoints.len());
    app.reports().record(&report, now_ms());
    app.metrics.report();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    service: Option<String>,
}

/// Server-sent events: the recent history, then every new event as it happens.
#[utoipa::path(get, path = "/v1/events", params(("service" = Option<String>, Query, description = "only this service")),
    responses((status = 200, content_type = "text/event-stream", body = doc::SseFrame), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn events(
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

/// The auto-scaling state of a service: policy, current and desired counts, manual hold, cost figures.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScalingView {
    pub policy: crate::scaling::policy::ScalingPolicy,
    pub current: u32,
    pub desired: u32,
    /// A manual scale holds the count until then (unix ms).
    pub hold_until_ms: Option<u64>,
    pub docker_reachable: bool,
    /// The supervisor host's CPU and memory use (%), from sysinfo.
    pub host_cpu_percent: f64,
    pub host_memory_percent: f64,
    pub cost: crate::scaling::cost::CostStats,
    pub cost_per_request: f64,
    pub efficiency: f64,
}

fn scaling_view(app: &App, service: &str) -> Result<ScalingView, ApiError> {
    let policy = app.registry().service(service)?.scaling.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_scaled",
            format!("service `{service}` has no container template"),
            None,
        )
    })?;
    let states = app.scaling();
    let st = states.get(service);
    let cost = st.map(|s| s.cost.clone()).unwrap_or_default();
    Ok(ScalingView {
        current: st.map_or(0, |s| s.current),
        desired: st.map_or(0, |s| s.desired),
        hold_until_ms: st.map(|s| s.hold_until_ms).filter(|t| *t > now_ms()),
        docker_reachable: app.docker_ok.load(std::sync::atomic::Ordering::SeqCst),
        host_cpu_percent: app.host_usage().0,
        host_memory_percent: app.host_usage().1,
        cost_per_request: cost.cost_per_request(policy.price_per_instance_hour),
        efficiency: cost.efficiency(),
        cost,
        policy,
    })
}

/// The scaling policy and state.
#[utoipa::path(get, path = "/v1/services/{service}/scaling", params(("service" = String, Path)),
    responses((status = 200, body = ScalingView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_scaling(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<ScalingView>, ApiError> {
    Ok(axum::Json(scaling_view(&app, &service)?))
}

/// Changes the scaling policy (the keys given are merged into the current policy, then validated).
#[utoipa::path(put, path = "/v1/services/{service}/scaling", params(("service" = String, Path)),
    request_body = crate::scaling::policy::ScalingPolicy,
    responses((status = 200, body = ScalingView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn put_scaling(
    State(app): State<AppState>,
    Path(service): Path<String>,
    body: Bytes,
) -> Result<axum::Json<ScalingView>, ApiError> {
    let patch: Value = parse(&body)?;
    let current = scaling_view(&app, &service)?.policy;
    let policy = current.with_overrides(Some(&patch)).map_err(|(f, r)| ApiError::invalid(f, r))?;
    app.change(|reg, now| reg.set_scaling(&service, policy.clone(), now).map(|e| ((), e)).map_err(ApiError::from))?;
    Ok(axum::Json(scaling_view(&app, &service)?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// The instance count to run (within min_instances and max_instances).
    #[schema(maximum = 1000)]
    pub instances: u32,
    /// How long the count holds before the autoscaler decides again (default 10 minutes).
    #[schema(value_type = Option<doc::Duration>)]
    pub hold: Option<equilibrio_filter::config::Millis>,
}

/// Scales by hand: runs `instances` and holds that count for `hold`.
#[utoipa::path(post, path = "/v1/services/{service}/scale", params(("service" = String, Path)), request_body = ScaleRequest,
    responses((status = 200, body = ScalingView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
async fn scale(
    State(app): State<AppState>,
    Path(service): Path<String>,
    body: Bytes,
) -> Result<axum::Json<ScalingView>, ApiError> {
    let req: ScaleRequest = parse(&body)?;
    let policy = scaling_view(&app, &service)?.policy;
    if req.instances < policy.min_instances || req.instances > policy.max_instances {
        return Err(ApiError::invalid(
            "instances",
            format!(
                "must be between min_instances {} and max_instances {}",
                policy.min_instances, policy.max_instances
            ),
        ));
    }
    let hold = req.hold.map_or(600_000, |h| h.0);
    if !(1000..=86_400_000).contains(&hold) {
        return Err(ApiError::invalid("hold", "must be between 1s and 24h"));
    }
    let now = now_ms();
    if let Some(st) = app.scaling().get_mut(&service) {
        st.manual_desired = Some(req.instances);
        st.hold_until_ms = now + hold;
        let from = st.current;
        st.record(crate::scaling::controller::ScalingEvent {
            time_ms: now,
            kind: "manual".into(),
            from,
            to: req.instances,
            reason: format!("manual scale, held for {} s", hold / 1000),
        });
        app.metrics.scaling_event(&service, "manual");
    }
    Ok(axum::Json(scaling_view(&app, &service)?))
}

/// Every scaling decision (time, from, to, reason), oldest first.
#[utoipa::path(get, path = "/v1/services/{service}/scaling/events", params(("service" = String, Path)),
    responses((status = 200, body = [crate::scaling::controller::ScalingEvent]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn scaling_events(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<Vec<crate::scaling::controller::ScalingEvent>>, ApiError> {
    scaling_view(&app, &service)?;
    Ok(axum::Json(app.scaling().get(&service).map(|s| s.events.iter().cloned().collect()).unwrap_or_default()))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Equilibrio supervisor", description = "Instances, health, endpoint tables and balancing policies"),
    paths(dashboard, livez, readyz, metrics, list_services, get_service, list_instances, register, deregister, update_instance, drain,
        heartbeat, get_policy, put_policy, get_health_check, put_health_check, endpoints, eds, reports, events, openapi,
        get_scaling, put_scaling, scale, scaling_events),
    components(schemas(ErrorBody, ErrorDetail, ServiceSummary, ServiceView, InstanceView, HostInfo, InstanceSpec, InstanceUpdate,
        DrainRequest, HealthCheck, HealthCheckUpdate, Report, Traffic, Event, ScalingView, ScaleRequest,
        crate::scaling::policy::ScalingPolicy, crate::scaling::controller::ScalingEvent, crate::scaling::cost::CostStats,
        doc::Registration, doc::PolicyUpdate, doc::DiscoveryRequest, doc::SseFrame)),
    modifiers(&BearerAuth, &OpenComposedSchemas)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
async fn openapi() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "openapi", e.to_string(), None).into_response(),
    }
}

/// Every route, for the router and for the test that checks the OpenAPI document covers them all.
pub const ROUTES: [(&str, &str); 25] = [
    ("get", "/"),
    ("get", "/livez"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/services"),
    ("get", "/v1/services/{service}"),
    ("get", "/v1/services/{service}/instances"),
    ("post", "/v1/services/{service}/instances"),
    ("delete", "/v1/services/{service}/instances/{id}"),
    ("put", "/v1/services/{service}/instances/{id}"),
    ("post", "/v1/services/{service}/instances/{id}/drain"),
    ("post", "/v1/services/{service}/instances/{id}/heartbeat"),
    ("get", "/v1/services/{service}/policy"),
    ("put", "/v1/services/{service}/policy"),
    ("get", "/v1/services/{service}/health_check"),
    ("put", "/v1/services/{service}/health_check"),
    ("get", "/v1/services/{service}/endpoints"),
    ("post", "/v3/discovery:endpoints"),
    ("post", "/v1/reports"),
    ("get", "/v1/events"),
    ("get", "/v1/services/{service}/scaling"),
    ("put", "/v1/services/{service}/scaling"),
    ("post", "/v1/services/{service}/scale"),
    ("get", "/v1/services/{service}/scaling/events"),
];

/// The router (no socket: tests call it directly).
pub fn router(app: AppState) -> Router {
    let faults = app.config.fault_injection;
    let routes = Router::new()
        .route("/", get(dashboard))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}", get(get_service))
        .route("/v1/services/{service}/instances", get(list_instances).post(register))
        .route("/v1/services/{service}/instances/{id}", put(update_instance).delete(deregister))
        .route("/v1/services/{service}/instances/{id}/drain", post(drain))
        .route("/v1/services/{service}/instances/{id}/heartbeat", post(heartbeat))
        .route("/v1/services/{service}/policy", get(get_policy).put(put_policy))
        .route("/v1/services/{service}/health_check", get(get_health_check).put(put_health_check))
        .route("/v1/services/{service}/endpoints", get(endpoints))
        .route("/v3/discovery:endpoints", post(eds))
        .route("/v1/reports", post(reports))
        .route("/v1/events", get(events))
        .route("/v1/services/{service}/scaling", get(get_scaling).put(put_scaling))
        .route("/v1/services/{service}/scale", post(scale))
        .route("/v1/services/{service}/scaling/events", get(scaling_events))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route", None) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    let routes = if faults { routes.layer(axum::middleware::from_fn(inject_faults)) } else { routes };
    routes
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .layer(axum::middleware::from_fn_with_state(app.clone(), contain_panics))
        .with_state(app)
}

mod doc;
use doc::OpenComposedSchemas;

#[cfg(test)]
mod tests;
