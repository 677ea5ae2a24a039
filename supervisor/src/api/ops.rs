//! The operator's view: the dashboard page, liveness and readiness, metrics, the services.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::errors::{ApiError, ErrorBody};
use super::views::{HostInfo, ServiceSummary, ServiceView, instance_view};
use crate::app::{AppState, now_ms};
use crate::metrics::InstanceSample;

/// The dashboard: services, instances, traffic, scaling and events, live (SSE). One file, served by the binary.
#[utoipa::path(get, path = "/", responses((status = 200, description = "text/html")))]
pub async fn dashboard() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("../dashboard.html")).into_response()
}

/// The process is alive.
#[utoipa::path(get, path = "/livez", responses((status = 200, description = "alive")))]
pub async fn livez() -> &'static str {
    "ok"
}

/// Ready for traffic (fails during shutdown).
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, description = "not ready: shutting down, or Docker unreachable while a service is auto-scaled")))]
pub async fn readyz(State(app): State<AppState>) -> Response {
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
pub async fn metrics(State(app): State<AppState>) -> Response {
    let now = now_ms();
    app.metrics.set_leader(app.leadership.is_leader());
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
pub async fn list_services(State(app): State<AppState>) -> axum::Json<HostInfo> {
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
pub async fn get_service(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<ServiceView>, ApiError> {
    let now = now_ms();
    let svc = app.registry().service(&service)?.clone();
    Ok(axum::Json(ServiceView {
        name: svc.name.clone(),
        version: svc.version,
        policy: equilibrio_contract::policy::redact(&svc.policy),
        health_check: svc.health_check.clone(),
        instances: svc.instances.values().map(|i| instance_view(&app, &service, i, now)).collect(),
    }))
}
