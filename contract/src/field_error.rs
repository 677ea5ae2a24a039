//! The one error of every configuration and body the project validates (the filter's JSON, the supervisor's and the
//! bundled proxy's YAML, policies, registrations, reports): the dotted key it is about and why, so that whoever reads
//! it knows which line to fix.

use std::fmt;

/// A refused value: `key` is the dotted path (`rate_limiting.burst_size`, `endpoints[2].id`; empty for the whole
/// document) and `reason` says what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub key: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError { key: key.into(), reason: reason.into() }
    }

    /// The same error about a key nested under `prefix` (`endpoints[2]` and `id` give `endpoints[2].id`).
    pub fn within(self, prefix: &str) -> FieldError {
        let key = match (prefix.is_empty(), self.key.is_empty()) {
            (true, _) => self.key,
            (false, true) => prefix.to_string(),
            (false, false) if self.key.starts_with('[') => format!("{prefix}{}", self.key),
            (false, false) => format!("{prefix}.{}", self.key),
        };
        FieldError { key, reason: self.reason }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() { write!(f, "{}", self.reason) } else { write!(f, "`{}`: {}", self.key, self.reason) }
    }
}

impl std::error::Error for FieldError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_and_displays_the_key() {
        assert_eq!(FieldError::new("id", "bad").within("endpoints[2]").key, "endpoints[2].id");
        assert_eq!(FieldError::new("[0].id", "bad").within("endpoints").key, "endpoints[0].id");
        assert_eq!(FieldError::new("", "bad").within("policy").key, "policy");
        assert_eq!(FieldError::new("a", "bad").within("").key, "a");
        assert_eq!(FieldError::new("a.b", "must be 1").to_string(), "`a.b`: must be 1");
        assert_eq!(FieldError::new("", "not JSON").to_string(), "not JSON");
    }
}
