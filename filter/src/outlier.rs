//! Passive health (outlier detection): endpoints that fail real requests are ejected from selection for a while.
//!
//! A worker counts consecutive failures per endpoint from the requests it proxies: gateway failures (connect failure,
//! reset, or an attempt the proxy moved to the next listed host) and 5xx answers. Past the configured run, it ejects
//! the endpoint for every worker through the shared [`Ejections`] record. The n-th ejection in a row lasts n times the
//! base time (capped), as in Envoy; an endpoint that stays clean for the cap forgets its history. At most
//! `max_ejection_percent` of the endpoints are ejected at once (at least one, if the percentage is above 0), so passive
//! health can never empty the pool. Time is an argument.

use serde::{Deserialize, Serialize};

use crate::config::PassiveHealthConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ejection {
    pub id: String,
    /// Ejected until this time (unix ms); in the past means "back in service, history kept".
    pub until_ms: u64,
    /// Ejections in a row.
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ejections {
    pub entries: Vec<Ejection>,
}

impl Ejections {
    pub fn decode(bytes: &[u8]) -> Ejections {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn is_ejected(&self, id: &str, now_ms: u64) -> bool {
        self.entries.iter().any(|e| e.id == id && e.until_ms > now_ms)
    }

    pub fn active(&self, now_ms: u64) -> usize {
        self.entries.iter().filter(|e| e.until_ms > now_ms).count()
    }

    /// Ejects `id` out of `total` endpoints. Returns the ejection time, or `None` if it is already ejected or the cap
    /// is reached.
    pub fn eject(&mut self, id: &str, total: usize, cfg: &PassiveHealthConfig, now_ms: u64) -> Option<u64> {
        self.forget(cfg, now_ms);
        if self.is_ejected(id, now_ms) {
            return None;
        }
        let cap =
            if cfg.max_ejection_percent == 0 { 0 } else { (total * cfg.max_ejection_percent as usize / 100).max(1) };
        if self.active(now_ms) >= cap {
            return None;
        }
        let count = self.entries.iter().find(|e| e.id == id).map_or(0, |e| e.count).saturating_add(1);
        let duration = cfg.base_ejection_time.0.saturating_mul(u64::from(count)).min(cfg.max_ejection_time.0);
        self.entries.retain(|e| e.id != id);
        self.entries.push(Ejection { id: id.to_string(), until_ms: now_ms.saturating_add(duration), count });
        Some(duration)
    }

    /// Drops the history of endpoints back in service for longer than the maximum ejection time.
    pub fn forget(&mut self, cfg: &PassiveHealthConfig, now_ms: u64) {
        self.entries.retain(|e| e.until_ms.saturating_add(cfg.max_ejection_time.0) > now_ms);
    }
}

/// A worker's run of consecutive failures for one endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streak {
    pub gateway: u32,
    pub server: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connect failure, reset, or the proxy moved on to the next host.
    GatewayFailure,
    /// A 5xx answer from the endpoint.
    ServerError,
}

impl Streak {
    /// Records an outcome; true when the streak now calls for an ejection.
    pub fn record(&mut self, outcome: Outcome, cfg: &PassiveHealthConfig) -> bool {
        match outcome {
            Outcome::Success => {
                *self = Streak::default();
                false
            }
            Outcome::GatewayFailure => {
                self.gateway = self.gateway.saturating_add(1);
                self.gateway >= cfg.consecutive_gateway_failures
            }
            Outcome::ServerError => {
                self.server = self.server.saturating_add(1);
                self.server >= cfg.consecutive_5xx
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Millis;

    fn cfg() -> PassiveHealthConfig {
        PassiveHealthConfig {
            base_ejection_time: Millis(10_000),
            max_ejection_time: Millis(60_000),
            max_ejection_percent: 50,
            ..PassiveHealthConfig::default()
        }
    }

    #[test]
    fn ejection_time_grows_on_repeats_and_is_capped() {
        let c = cfg();
        let mut e = Ejections::default();
        assert_eq!(e.eject("a", 4, &c, 0), Some(10_000));
        assert!(e.is_ejected("a", 9_999));
        assert!(!e.is_ejected("a", 10_000));
        assert_eq!(e.eject("a", 4, &c, 10_000), Some(20_000));
        assert_eq!(e.eject("a", 4, &c, 30_000), Some(30_000));
        for t in [60_000, 120_000, 180_000, 240_000] {
            e.eject("a", 4, &c, t);
        }
        assert!(e.entries[0].until_ms - 240_000 <= 60_000);
    }

    #[test]
    fn history_is_forgotten_after_a_clean_spell() {
        let c = cfg();
        let mut e = Ejections::default();
        e.eject("a", 4, &c, 0);
        e.eject("a", 4, &c, 10_000);
        // back at 30 s; clean until 30 s + 60 s
        assert_eq!(e.eject("a", 4, &c, 100_000), Some(10_000));
    }

    #[test]
    fn never_more_than_the_cap() {
        let c = cfg();
        let mut e = Ejections::default();
        assert!(e.eject("a", 3, &c, 0).is_some());
        assert_eq!(e.eject("b", 3, &c, 0), None, "50% of 3 is 1");
        let mut e = Ejections::default();
        assert!(e.eject("a", 1, &c, 0).is_some(), "at least one");
        let none = PassiveHealthConfig { max_ejection_percent: 0, ..cfg() };
        assert_eq!(Ejections::default().eject("a", 10, &none, 0), None);
    }

    #[test]
    fn streaks_reset_on_success() {
        let c = PassiveHealthConfig { consecutive_5xx: 3, consecutive_gateway_failures: 1, ..cfg() };
        let mut s = Streak::default();
        assert!(!s.record(Outcome::ServerError, &c));
        assert!(!s.record(Outcome::ServerError, &c));
        assert!(!s.record(Outcome::Success, &c));
        assert!(!s.record(Outcome::ServerError, &c));
        assert!(!s.record(Outcome::ServerError, &c));
        assert!(s.record(Outcome::ServerError, &c));
        assert!(Streak::default().record(Outcome::GatewayFailure, &c));
    }

    #[test]
    fn garbage_decodes_to_nothing() {
        assert_eq!(Ejections::decode(b"\xff\x00"), Ejections::default());
        let mut e = Ejections::default();
        e.eject("a", 2, &cfg(), 5);
        assert_eq!(Ejections::decode(&e.encode()), e);
    }
}
