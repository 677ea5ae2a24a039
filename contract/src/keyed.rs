//! What every configuration and API body of the project shares: durations (seconds, or a string with a unit), the
//! keyed deserializer whose errors name the dotted key, and the JSON merge of runtime overrides.

use serde::Deserialize;
use serde_json::Value;

use crate::field_error::FieldError;

/// A duration given as seconds (a number) or a string with a unit (`"500ms"`, `"2s"`, `"5m"`, `"1h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        parse_duration(&v).map(Millis).map_err(serde::de::Error::custom)
    }
}

/// Parses a duration value into milliseconds; see [`Millis`].
pub fn parse_duration(v: &Value) -> Result<u64, String> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(s) if s.is_finite() && (0.0..=1e9).contains(&s) => Ok((s * 1000.0).round() as u64),
            _ => Err(format!("invalid duration {n}: expected seconds between 0 and 1e9")),
        },
        Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let factor = match unit.trim() {
                "ms" => 1.0,
                "s" | "" => 1000.0,
                "m" => 60_000.0,
                "h" => 3_600_000.0,
                other => {
                    return Err(format!("invalid duration \"{s}\": unknown unit `{other}` (use ms, s, m or h)"));
                }
            };
            match num.parse::<f64>() {
                Ok(x) if x.is_finite() && x <= 1e12 => Ok((x * factor).round() as u64),
                _ => Err(format!("invalid duration \"{s}\": expected a number followed by ms, s, m or h")),
            }
        }
        other => Err(format!("invalid duration {other}: expected seconds or a string such as \"500ms\"")),
    }
}

/// Deserializes `v` into `T`; on failure, the dotted key the error is about (see [`error_key`]) and the reason.
/// Every configuration in the project (the filter's JSON, the supervisor's and the bundled proxy's YAML, scaling
/// policies) reports its errors this way.
pub fn deserialize_keyed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        FieldError::new(error_key(&path, &inner), inner)
    })
}

/// The dotted key a `serde_path_to_error` failure is about: its path (`.` for the document itself), completed with
/// the field serde names in an "unknown field" message. Empty when it is about the whole document.
pub fn error_key(path: &str, message: &str) -> String {
    let key = if path == "." { "" } else { path };
    match message.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
        Some(field) if key.is_empty() => field.to_string(),
        Some(field) if !key.ends_with(field) => format!("{key}.{field}"),
        _ => key.to_string(),
    }
}

/// Recursive JSON merge: objects merge key by key, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}
