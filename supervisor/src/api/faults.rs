//! Failure containment: a panic in one call costs that call a 500, not the process; and the test-only fault
//! injection that shows it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::errors::ApiError;
use crate::app::AppState;

/// A panic in one request's handler costs that request a 500, not the process (release builds unwind): counted in
/// `handler_panics` and logged with the request line.
pub async fn contain_panics(
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
pub async fn inject_faults(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.headers().get("x-equilibrio-fault").is_some_and(|v| v == "panic") {
        #[allow(clippy::panic)] // the one deliberate panic: what this layer exists for
        {
            panic!("fault injected by x-equilibrio-fault");
        }
    }
    next.run(request).await
}
