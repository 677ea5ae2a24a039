//! Request-rate thresholds with their unit. Our users' plan (docs/configuration.md) counts requests per instance per
//! minute, which is what a bare number means (and what the API shows); a string names its unit, so `"100/s"` and
//! `"6000/min"` are the same threshold. Real services are sized in requests per second, the plan's examples in
//! requests per minute: both read as written.

use equilibrio_contract::FieldError;
use serde_json::Value;

/// The threshold keys that take a rate.
const RATE_KEYS: [&str; 2] = ["scale_up_threshold", "scale_down_threshold"];

/// Parses a rate (`120`, `"2/s"`, `"120/min"`) into requests per minute.
pub fn per_minute(v: &Value) -> Result<f64, String> {
    let bad = || {
        format!(
            "expected requests per minute (a number) or a rate with its unit such as \"100/s\" or \"6000/min\", got {v}"
        )
    };
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(bad),
        Value::String(s) => {
            let (amount, unit) = s.split_once('/').ok_or_else(bad)?;
            let amount: f64 = amount.trim().parse().map_err(|_| bad())?;
            if !amount.is_finite() || amount < 0.0 {
                return Err(bad());
            }
            match unit.trim() {
                "s" | "sec" | "second" => Ok(amount * 60.0),
                "m" | "min" | "minute" => Ok(amount),
                _ => Err(bad()),
            }
        }
        _ => Err(bad()),
    }
}

/// Rewrites `request_rate`'s thresholds in a (merged) scaling policy document to numbers per minute; on error gives
/// the dotted key and the reason.
pub fn normalize(policy: &mut Value) -> Result<(), FieldError> {
    let Some(rate) = policy.get_mut("request_rate").and_then(Value::as_object_mut) else { return Ok(()) };
    for key in RATE_KEYS {
        if let Some(v) = rate.get_mut(key) {
            let n = per_minute(v).map_err(|r| FieldError::new(format!("request_rate.{key}"), r))?;
            *v = serde_json::json!(n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn units_read_as_written() {
        assert_eq!(per_minute(&json!(100)), Ok(100.0));
        assert_eq!(per_minute(&json!("100/s")), Ok(6000.0));
        assert_eq!(per_minute(&json!("6000/min")), Ok(6000.0));
        assert_eq!(per_minute(&json!(" 2.5 / s ")), Ok(150.0));
        for bad in [json!("100"), json!("100/h"), json!("-1/s"), json!("x/s"), json!(true), json!("NaN/s")] {
            assert!(per_minute(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn normalize_names_the_key() {
        let mut p = json!({"request_rate": {"scale_up_threshold": "50/s", "scale_down_threshold": 300}});
        normalize(&mut p).unwrap();
        assert_eq!(p["request_rate"]["scale_up_threshold"], json!(3000.0));
        assert_eq!(p["request_rate"]["scale_down_threshold"], json!(300.0));
        let mut p = json!({"request_rate": {"scale_up_threshold": "fast"}});
        assert_eq!(normalize(&mut p).unwrap_err().key, "request_rate.scale_up_threshold");
    }
}
