//! One Docker API call as the runtimes make it: with a timeout, its error as a [`RuntimeError`] (an answer from the
//! daemon is `Failed` with its message; no answer, or no connection, is `Unreachable`).

use std::time::Duration;

use super::runtime::RuntimeError;

pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn failed(e: bollard::errors::Error) -> RuntimeError {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            RuntimeError::Failed(format!("docker answered {status_code}: {message}"))
        }
        other => RuntimeError::Unreachable(other.to_string()),
    }
}

pub async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, RuntimeError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(failed),
        Err(_) => Err(RuntimeError::Unreachable(format!("no answer in {} s", CALL_TIMEOUT.as_secs()))),
    }
}
