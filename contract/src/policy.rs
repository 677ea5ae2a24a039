//! The balancing policy as it travels between the supervisor, its API and the proxies: a JSON object of the filter's
//! policy keys (the filter validates it). What may be shown of it to anyone.

use serde_json::{Value, json};

/// A policy fit to show to anyone: the sticky-session secret is replaced by `<redacted>` (sending that back through
/// the API keeps the secret).
pub fn redact(policy: &Value) -> Value {
    let mut p = policy.clone();
    if let Some(secret) = p.pointer_mut("/sticky_sessions/secret")
        && !secret.is_null()
    {
        *secret = json!("<redacted>");
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_secret() {
        let p = json!({"sticky_sessions": {"enabled": true, "secret": "s3cr3t-s3cr3t-s3cr3t"}});
        assert_eq!(redact(&p)["sticky_sessions"]["secret"], "<redacted>");
        assert_eq!(redact(&json!({}))["algorithm"], Value::Null);
    }
}
