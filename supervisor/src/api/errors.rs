//! The API's errors: one JSON shape, `{"error": {"code", "message", "field"}}`, for every 4xx and 5xx, and the one
//! body parser, which names the offending field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

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
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
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
        let field = Some(equilibrio_contract::keyed::error_key(&path, &inner.to_string())).filter(|k| !k.is_empty());
        let status = if inner.is_syntax() || inner.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        let code = if status == StatusCode::BAD_REQUEST { "invalid_json" } else { "invalid_value" };
        ApiError::new(status, code, inner.to_string(), field)
    })
}
