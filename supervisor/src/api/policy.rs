//! A service's balancing policy and health-check settings.

use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::body::Body;
use super::doc;
use super::errors::{ApiError, ErrorBody};
use crate::app::AppState;
use crate::config::{HealthCheck, validate_health, validate_policy};
use equilibrio_contract::policy::POLICY_KEYS;

/// The balancing policy (the sticky-session secret is redacted).
#[utoipa::path(get, path = "/v1/services/{service}/policy", params(("service" = String, Path)),
    responses((status = 200, body = Object), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_policy(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(equilibrio_contract::policy::redact(&app.registry().service(&service)?.policy)))
}

/// Replaces the balancing policy (`algorithm`, `consistent_hash`, `sticky_sessions`, `rate_limiting`,
/// `passive_health`, `observation`), validated as the filter validates it. A `secret` of `<redacted>` keeps the
/// current secret.
#[utoipa::path(put, path = "/v1/services/{service}/policy", params(("service" = String, Path)), request_body = doc::PolicyUpdate,
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_policy(
    State(app): State<AppState>,
    Path(service): Path<String>,
    Body(mut policy): Body<Value>,
) -> Result<axum::Json<Value>, ApiError> {
    let Some(obj) = policy.as_object() else { return Err(ApiError::invalid("", "expected a JSON object")) };
    const KEYS: &[&str] = &POLICY_KEYS;
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
    validate_policy(&policy)?;
    app.change(|reg, now| reg.set_policy(&service, policy.clone(), now).map(|e| ((), e)).map_err(ApiError::from))
        .await?;
    Ok(axum::Json(equilibrio_contract::policy::redact(&policy)))
}

/// Health-check settings as the API takes them (durations in seconds or with a unit).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckUpdate {
    /// At least the timeout.
    #[schema(value_type = Option<doc::Duration>)]
    pub interval: Option<equilibrio_contract::keyed::Millis>,
    #[schema(value_type = Option<doc::Duration>)]
    pub timeout: Option<equilibrio_contract::keyed::Millis>,
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
pub async fn get_health_check(
    State(app): State<AppState>,
    Path(service): Path<String>,
) -> Result<axum::Json<HealthCheck>, ApiError> {
    Ok(axum::Json(app.registry().service(&service)?.health_check.clone()))
}

/// Changes health-check settings (the keys given; the others stay).
#[utoipa::path(put, path = "/v1/services/{service}/health_check", params(("service" = String, Path)), request_body = HealthCheckUpdate,
    responses((status = 200, body = HealthCheck), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_health_check(
    State(app): State<AppState>,
    Path(service): Path<String>,
    Body(u): Body<HealthCheckUpdate>,
) -> Result<axum::Json<HealthCheck>, ApiError> {
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
    validate_health(&h)?;
    app.change(|reg, now| reg.set_health_check(&service, h.clone(), now).map(|e| ((), e)).map_err(ApiError::from))
        .await?;
    Ok(axum::Json(h))
}
