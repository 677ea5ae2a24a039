//! Passive health (outlier detection) and the circuit breaker each endpoint goes through: closed -> open (ejected) ->
//! half-open -> closed.
//!
//! A worker counts consecutive failures per endpoint from the requests it proxies: gateway failures (connect failure,
//! reset, or an attempt the proxy moved to the next listed host) and 5xx answers. Past the configured run, it ejects
//! the endpoint for every worker through the shared [`Ejections`] record; the poller adds the ejections of the
//! success-rate and failure-percentage detectors (`crate::detection`). The n-th ejection in a row lasts n times the
//! base time (capped), as in Envoy. When the time is up the endpoint is half-open: it takes no normal traffic, but up to
//! `half_open_trials` trial requests at a time (a trial not answered within the base ejection time is given again); the
//! first trial that succeeds closes the breaker, one that fails ejects the endpoint again, for longer. An endpoint that
//! stays closed for the cap forgets its history. At most `max_ejection_percent` of the endpoints are out (open or
//! half-open) at once (at least one, if the percentage is above 0), so passive health can never empty the pool. Time
//! is an argument.

use serde::{Deserialize, Serialize};

use crate::config::PassiveHealthConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ejection {
    pub id: String,
    /// Ejected until this time (unix ms); in the past means half-open (`probing`) or back in service.
    pub until_ms: u64,
    /// Ejections in a row.
    pub count: u32,
    /// Half-open once `until_ms` has passed, until a trial succeeds.
    #[serde(default)]
    pub probing: bool,
    /// Trials given in this half-open round, and when the last one was.
    #[serde(default)]
    pub trials: u32,
    #[serde(default)]
    pub trial_ms: u64,
}

/// Where an endpoint's breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Closed,
    Open,
    /// Half-open; `trial`: a trial request may be sent now.
    HalfOpen {
        trial: bool,
    },
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

    pub fn breaker(&self, id: &str, cfg: &PassiveHealthConfig, now_ms: u64) -> Breaker {
        match self.entries.iter().find(|e| e.id == id) {
            Some(e) if e.until_ms > now_ms => Breaker::Open,
            Some(e) if e.probing => Breaker::HalfOpen { trial: trial_due(e, cfg, now_ms) },
            _ => Breaker::Closed,
        }
    }

    /// Out of normal selection: open or half-open.
    pub fn is_ejected(&self, id: &str, now_ms: u64) -> bool {
        self.entries.iter().any(|e| e.id == id && is_out(e, now_ms))
    }

    /// Endpoints out of normal selection (open or half-open).
    pub fn active(&self, now_ms: u64) -> usize {
        self.entries.iter().filter(|e| is_out(e, now_ms)).count()
    }

    /// Whether some endpoint may take a trial request now.
    pub fn trial_due(&self, cfg: &PassiveHealthConfig, now_ms: u64) -> bool {
        self.entries.iter().any(|e| e.probing && e.until_ms <= now_ms && trial_due(e, cfg, now_ms))
    }

    /// Ejects `id` out of `total` endpoints. Returns the ejection time, or `None` if it is already open or the cap
    /// is reached. A half-open endpoint is re-ejected whatever the cap (it is counted in it already).
    pub fn eject(&mut self, id: &str, total: usize, cfg: &PassiveHealthConfig, now_ms: u64) -> Option<u64> {
        self.forget(cfg, now_ms);
        let current = self.breaker(id, cfg, now_ms);
        if current == Breaker::Open {
            return None;
        }
        let cap =
            if cfg.max_ejection_percent == 0 { 0 } else { (total * cfg.max_ejection_percent as usize / 100).max(1) };
        if current == Breaker::Closed && self.active(now_ms) >= cap {
            return None;
        }
        let count = self.entries.iter().find(|e| e.id == id).map_or(0, |e| e.count).saturating_add(1);
        let duration = cfg.base_ejection_time.0.saturating_mul(u64::from(count)).min(cfg.max_ejection_time.0);
        self.entries.retain(|e| e.id != id);
        self.entries.push(Ejection {
            id: id.to_string(),
            until_ms: now_ms.saturating_add(duration),
            count,
            probing: cfg.half_open_trials > 0,
            trials: 0,
            trial_ms: 0,
        });
        Some(duration)
    }

    /// Takes a trial for half-open `id`; false if none is due.
    pub fn take_trial(&mut self, id: &str, cfg: &PassiveHealthConfig, now_ms: u64) -> bool {
        let Some(e) = self.entries.iter_mut().find(|e| e.id == id && e.probing && e.until_ms <= now_ms) else {
            return false;
        };
        if !trial_due(e, cfg, now_ms) {
            return false;
        }
        if now_ms >= e.trial_ms.saturating_add(cfg.base_ejection_time.0) {
            // a new round: trials given before and never answered are forgotten
            e.trials = 0;
        }
        e.trials += 1;
        e.trial_ms = now_ms;
        true
    }

    /// A trial succeeded: the breaker closes (the history stays until it is forgotten). False if it was not half-open.
    pub fn close(&mut self, id: &str) -> bool {
        match self.entries.iter_mut().find(|e| e.id == id && e.probing) {
            Some(e) => {
                e.probing = false;
                e.trials = 0;
                true
            }
            None => false,
        }
    }

    /// Drops the history of endpoints closed for longer than the maximum ejection time.
    pub fn forget(&mut self, cfg: &PassiveHealthConfig, now_ms: u64) {
        self.entries.retain(|e| e.probing || e.until_ms.saturating_add(cfg.max_ejection_time.0) > now_ms);
    }
}

fn is_out(e: &Ejection, now_ms: u64) -> bool {
    e.until_ms > now_ms || e.probing
}

/// A half-open endpoint takes a trial while fewer than `half_open_trials` are out, or when the last one is older than
/// the base ejection time (it was never answered).
fn trial_due(e: &Ejection, cfg: &PassiveHealthConfig, now_ms: u64) -> bool {
    e.trials < cfg.half_open_trials || now_ms >= e.trial_ms.saturating_add(cfg.base_ejection_time.0)
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
            // the breaker's half-open state has its own test
            half_open_trials: 0,
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
    fn half_open_gives_bounded_trials_then_closes_or_reopens_for_longer() {
        let c = PassiveHealthConfig { half_open_trials: 2, ..cfg() };
        let mut e = Ejections::default();
        assert_eq!(e.eject("a", 4, &c, 0), Some(10_000));
        assert_eq!(e.breaker("a", &c, 5_000), Breaker::Open);
        assert!(!e.take_trial("a", &c, 5_000), "no trial while open");
        assert_eq!(e.breaker("a", &c, 10_000), Breaker::HalfOpen { trial: true });
        assert!(e.is_ejected("a", 10_000), "half-open takes no normal traffic");
        assert!(e.take_trial("a", &c, 10_000) && e.take_trial("a", &c, 10_001));
        assert!(!e.take_trial("a", &c, 10_002), "two trials at a time");
        assert_eq!(e.breaker("a", &c, 10_002), Breaker::HalfOpen { trial: false });
        // a trial fails: open again, for twice as long
        assert_eq!(e.eject("a", 4, &c, 10_003), Some(20_000));
        assert_eq!(e.breaker("a", &c, 30_002), Breaker::Open);
        assert!(e.take_trial("a", &c, 30_003));
        // unanswered trials are given again after the base ejection time
        assert!(e.take_trial("a", &c, 30_004) && !e.take_trial("a", &c, 30_005));
        assert!(e.take_trial("a", &c, 40_004));
        // a trial succeeds: closed, back in selection
        assert!(e.close("a"));
        assert_eq!(e.breaker("a", &c, 40_005), Breaker::Closed);
        assert!(!e.is_ejected("a", 40_005));
        assert!(!e.close("a"), "already closed");
    }

    #[test]
    fn without_trials_the_endpoint_comes_straight_back() {
        let c = PassiveHealthConfig { half_open_trials: 0, ..cfg() };
        let mut e = Ejections::default();
        e.eject("a", 4, &c, 0);
        assert_eq!(e.breaker("a", &c, 10_000), Breaker::Closed);
    }

    #[test]
    fn garbage_decodes_to_nothing() {
        assert_eq!(Ejections::decode(b"\xff\x00"), Ejections::default());
        let mut e = Ejections::default();
        e.eject("a", 2, &cfg(), 5);
        assert_eq!(Ejections::decode(&e.encode()), e);
    }
}
