//! The REST API: management for operators, tables for the proxies, reports from them, health and metrics.
//!
//! Each route is declared once ([`routes`]): the router and the OpenAPI document at `/openapi.json` both come from
//! that list (utoipa-axum), so neither can miss one. Authorization is one layer over every route ([`auth`]); errors
//! are one JSON shape naming the field ([`errors`]); a panic costs only its call ([`faults`]). The handlers, by
//! concern: [`ops`] (dashboard, probes, metrics, services), [`instances`], [`policy`] (balancing and health checks),
//! [`proxies`] (tables, EDS, reports, events), [`scaling`]; [`doc`] holds the document's own schemas.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;

pub mod auth;
pub mod body;
mod doc;
pub mod errors;
pub mod faults;
pub mod instances;
pub mod ops;
pub mod policy;
pub mod proxies;
pub mod scaling;
pub mod views;

use errors::ApiError;

/// Largest request body accepted (Envoy's EDS request carries its whole node description: about 80 KB).
pub const MAX_BODY: usize = 1 << 20;

#[derive(OpenApi)]
#[openapi(
    info(title = "Equilibrio supervisor", description = "Instances, health, endpoint tables and balancing policies"),
    components(schemas(errors::ErrorBody, errors::ErrorDetail, views::ServiceSummary, views::ServiceView,
        views::InstanceView, views::HostInfo, crate::config::InstanceSpec, crate::registry::InstanceUpdate,
        instances::DrainRequest, crate::config::HealthCheck, policy::HealthCheckUpdate, crate::reports::Report,
        crate::reports::Traffic, crate::events::Event, scaling::ScalingView, scaling::ScaleRequest,
        crate::scaling::policy::ScalingPolicy, crate::scaling::state::ScalingEvent, crate::scaling::cost::CostStats,
        doc::Registration, doc::PolicyUpdate, proxies::DiscoveryRequest, doc::SseFrame)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

use doc::OpenComposedSchemas;

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

/// Every route, once: for the router and for the document.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::dashboard))
        .routes(routes!(ops::livez))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(openapi))
        .routes(routes!(ops::list_services))
        .routes(routes!(ops::get_service))
        .routes(routes!(instances::list_instances, instances::register))
        .routes(routes!(instances::update_instance, instances::deregister))
        .routes(routes!(instances::drain))
        .routes(routes!(instances::heartbeat))
        .routes(routes!(policy::get_policy, policy::put_policy))
        .routes(routes!(policy::get_health_check, policy::put_health_check))
        .routes(routes!(proxies::endpoints))
        .routes(routes!(proxies::eds))
        .routes(routes!(proxies::reports))
        .routes(routes!(proxies::events))
        .routes(routes!(scaling::get_scaling, scaling::put_scaling))
        .routes(routes!(scaling::scale))
        .routes(routes!(scaling::scaling_events))
}

/// The OpenAPI document of every route.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = routes().into_openapi();
    // after the routes added their schemas: it edits one of them
    utoipa::Modify::modify(&OpenComposedSchemas, &mut doc);
    doc
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
async fn openapi() -> Response {
    // built once: the document never changes while the process runs
    static JSON: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    match JSON.get_or_init(|| document().to_json().map_err(|e| e.to_string())) {
        Ok(json) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json.clone()).into_response()
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "openapi", e.clone(), None).into_response(),
    }
}

/// The router (no socket: tests call it directly).
pub fn router(app: AppState) -> Router {
    let (routes, _) = routes().split_for_parts();
    let routes = routes
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route", None) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    let routes = if app.config.fault_injection {
        routes.layer(axum::middleware::from_fn(faults::inject_faults))
    } else {
        routes
    };
    routes
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth::guard))
        .layer(axum::middleware::from_fn_with_state(app.clone(), faults::contain_panics))
        .with_state(app)
}

#[cfg(test)]
mod tests;
