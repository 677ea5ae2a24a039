//! Instances: list, register, change, drain, heartbeat, deregister.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::body::{Body, OptionalBody, from_value};
use super::doc;
use super::errors::{ApiError, ErrorBody};
use super::views::{InstanceView, instance_view};
use crate::app::{App, AppState, now_ms};
use crate::config::InstanceSpec;
use crate::registry::RegistryError;
use crate::registry::{InstanceUpdate, Source};

/// The instances of a service.
#[utoipa::path(get, path = "/v1/services/{service}/instances", params(("service" = String, Path)),
    responses((status = 200, body = [InstanceView]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_instances(
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
    pub heartbeat_ttl: Option<equilibrio_contract::keyed::Millis>,
}

/// Registers an instance.
#[utoipa::path(post, path = "/v1/services/{service}/instances", params(("service" = String, Path)), request_body = doc::Registration,
    responses((status = 201, body = InstanceView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
pub async fn register(
    State(app): State<AppState>,
    Path(service): Path<String>,
    Body(raw): Body<Value>,
) -> Result<Response, ApiError> {
    // flatten and deny_unknown_fields do not mix in serde: check the keys by hand
    if let Some(obj) = raw.as_object() {
        const KNOWN: [&str; 8] =
            ["id", "address", "weight", "zone", "tags", "version", "capabilities", "heartbeat_ttl"];
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ApiError::invalid(k.clone(), format!("unknown field `{k}`")));
        }
    }
    let mut spec: InstanceSpec = from_value(&without(&raw, "heartbeat_ttl"))?;
    let ttl = match raw.get("heartbeat_ttl") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            equilibrio_contract::keyed::parse_duration(v)
                .ok()
                .filter(|ms| (1000..=86_400_000).contains(ms))
                .ok_or_else(|| ApiError::invalid("heartbeat_ttl", "must be a duration between 1s and 24h"))?,
        ),
    };
    spec.validate()?;
    let id = spec.id.clone();
    app.change(|reg, now| {
        reg.register(&service, spec.clone(), Source::Api, ttl, now).map(|e| ((), e)).map_err(ApiError::from)
    })
    .await?;
    let now = now_ms();
    let view = {
        let reg = app.registry();
        let inst = reg.service(&service)?.instances.get(&id).cloned();
        inst.map(|i| instance_view(&app, &service, &i, now))
    };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

pub fn without(v: &Value, key: &str) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove(key);
    }
    v
}

/// Deregisters an instance.
#[utoipa::path(delete, path = "/v1/services/{service}/instances/{id}", params(("service" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn deregister(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.change(|reg, now| {
        reg.deregister(&service, &id, now, "deregistered through the API").map(|e| ((), e)).map_err(ApiError::from)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes an instance's weight or zone.
#[utoipa::path(put, path = "/v1/services/{service}/instances/{id}", params(("service" = String, Path), ("id" = String, Path)),
    request_body = InstanceUpdate,
    responses((status = 200, body = InstanceView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_instance(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    Body(u): Body<InstanceUpdate>,
) -> Result<axum::Json<InstanceView>, ApiError> {
    if let Some(w) = u.weight
        && w > equilibrio_contract::table::MAX_WEIGHT
    {
        return Err(ApiError::invalid("weight", format!("must be at most {}", equilibrio_contract::table::MAX_WEIGHT)));
    }
    if let Some(z) = &u.zone {
        crate::config::validate_zone(z).map_err(|r| ApiError::invalid("zone", r))?;
    }
    app.change(|reg, now| reg.update(&service, &id, &u, now).map(|e| ((), e)).map_err(ApiError::from)).await?;
    instance(&app, &service, &id)
}

pub fn instance(app: &App, service: &str, id: &str) -> Result<axum::Json<InstanceView>, ApiError> {
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
    pub timeout: Option<equilibrio_contract::keyed::Millis>,
}

/// Drains an instance: no new traffic (its sticky sessions stay until they end); done when nothing is in flight.
#[utoipa::path(post, path = "/v1/services/{service}/instances/{id}/drain", params(("service" = String, Path), ("id" = String, Path)),
    request_body = Option<DrainRequest>,
    responses((status = 200, body = InstanceView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn drain(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    OptionalBody(req): OptionalBody<DrainRequest>,
) -> Result<axum::Json<InstanceView>, ApiError> {
    let timeout = req.timeout.map_or(app.config.drain_timeout_ms, |m| m.0);
    if !(100..=3_600_000).contains(&timeout) {
        return Err(ApiError::invalid("timeout", "must be between 100ms and 1h"));
    }
    app.change(|reg, now| reg.drain(&service, &id, timeout, now).map(|e| ((), e)).map_err(ApiError::from)).await?;
    instance(&app, &service, &id)
}

/// Renews a heartbeat-TTL registration.
#[utoipa::path(post, path = "/v1/services/{service}/instances/{id}/heartbeat", params(("service" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn heartbeat(
    State(app): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    // kept in the store too: with several supervisors, the leader expires heartbeats that reached any of them
    app.change(|reg, now| reg.heartbeat(&service, &id, now).map(|()| ((), vec![])).map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT)
}
