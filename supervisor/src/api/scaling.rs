//! A service's auto-scaling: its state and policy, a manual scale, its decisions.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::body::Body;
use super::doc;
use super::errors::{ApiError, ErrorBody};
use crate::app::{App, AppState, now_ms};

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

pub fn scaling_view(app: &App, service: &str) -> Result<ScalingView, ApiError> {
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
pub async fn get_scaling(
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
pub async fn put_scaling(
    State(app): State<AppState>,
    Path(service): Path<String>,
    Body(patch): Body<Value>,
) -> Result<axum::Json<ScalingView>, ApiError> {
    let current = scaling_view(&app, &service)?.policy;
    let policy = current.with_overrides(Some(&patch))?;
    app.change(|reg, now| reg.set_scaling(&service, policy.clone(), now).map(|e| ((), e)).map_err(ApiError::from))
        .await?;
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
    pub hold: Option<equilibrio_contract::keyed::Millis>,
}

/// Scales by hand: runs `instances` and holds that count for `hold`.
#[utoipa::path(post, path = "/v1/services/{service}/scale", params(("service" = String, Path)), request_body = ScaleRequest,
    responses((status = 200, body = ScalingView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn scale(
    State(app): State<AppState>,
    Path(service): Path<String>,
    Body(req): Body<ScaleRequest>,
) -> Result<axum::Json<ScalingView>, ApiError> {
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
    let _now = now_ms();
    if let Some(st) = app.scaling().get_mut(&service) {
        st.hold_manual(req.instances, hold, now_ms());
        app.metrics.scaling_event(&service, crate::scaling::state::ScalingEventKind::Manual.as_str());
    }
    Ok(axum::Json(scaling_view(&app, &service)?))
}

/// Every scaling decision (time, from, to, reason), oldest first.
#[utoipa::path(get, path = "/v1/services/{service}/scaling/events", params(("service" = String, Path)),
    responses((status = 200, body = [crate::scaling::state::ScalingEvent]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn scaling_events(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<Vec<crate::scaling::state::ScalingEvent>>, ApiError> {
    scaling_view(&app, &service)?;
    Ok(axum::Json(app.scaling().get(&service).map(|s| s.events.iter().cloned().collect()).unwrap_or_default()))
}
