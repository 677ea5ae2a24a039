//! The API's errors: one JSON shape, `{"error": {"code", "message", "field"}}`, for every 4xx and 5xx, made from the
//! errors of the layers below (a [`FieldError`] of any validation, the registry's, the store's).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use equilibrio_contract::FieldError;

use crate::persist::PersistError;
use crate::registry::RegistryError;

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
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>, field: Option<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field }
    }
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
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

/// A refused value: 422 naming the field (the whole body when the key is empty).
impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        let field = Some(e.key).filter(|k| !k.is_empty());
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", e.reason, field)
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

/// A change the store did not keep was not made: 503 when trying again later can work (etcd unreachable or without
/// quorum, a race lost too often, leadership moving), 500 for a state file that cannot be written.
impl From<PersistError> for ApiError {
    fn from(e: PersistError) -> Self {
        let (status, code) = match &e {
            PersistError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            PersistError::Conflict => (StatusCode::SERVICE_UNAVAILABLE, "store_conflict"),
            PersistError::NotLeader => (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
            PersistError::Read { .. } | PersistError::Corrupt { .. } | PersistError::Write { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "state_not_saved")
            }
        };
        tracing::error!(error = %e, "change not kept");
        ApiError::new(status, code, e.to_string(), None)
    }
}
