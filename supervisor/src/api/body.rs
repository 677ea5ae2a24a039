//! The one way a handler reads a JSON body: the [`Body`] extractor (and [`OptionalBody`] for a body that may be
//! empty). A body that is not JSON is a 400, one that does not fit the type a 422; both in the API's error shape and
//! naming the offending field, so that no handler parses by hand and no two handlers answer the same mistake
//! differently.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::ApiError;

/// A JSON object body parsed into `T`.
pub struct Body<T>(pub T);

/// A JSON object body parsed into `T`, or `T::default()` when the body is empty.
pub struct OptionalBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        parse(&bytes(req, state).await?).map(Body)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = bytes(req, state).await?;
        if bytes.is_empty() { Ok(OptionalBody(T::default())) } else { parse(&bytes).map(OptionalBody) }
    }
}

async fn bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|r| ApiError::new(r.status(), "invalid_body", r.body_text(), None))
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
    // the common case, a valid body, is parsed once at full speed; the path of a mistake is traced on a second pass
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
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

/// Reads a part of a body already parsed as JSON into `T`, naming the offending field on error.
pub fn from_value<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    Ok(equilibrio_contract::keyed::deserialize_keyed(v)?)
}
