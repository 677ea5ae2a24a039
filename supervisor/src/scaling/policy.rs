//! The scaling decision: how many instances a service should run, from its metrics. Pure: samples, history and time in;
//! a decision with its reason out.
//!
//! Sizing is proportional, as Kubernetes' HPA: `desired = ceil(current x utilization / target)`, with a tolerance band
//! (10%) inside which nothing moves. The four metrics of our users' plan (docs/configuration.md) (CPU, memory, request rate per instance per minute,
//! response time) are combined by their weights into one utilization; a metric above its own `scale_up_threshold` is
//! an emergency that scales up on its own account even if the others are calm. A metric weighted 0 plays no part at all.
//!
//! Asymmetric on purpose: scale-up looks at the last few seconds (`scale_up_window`) and acts after a short
//! stabilization, at most +100% or +4 instances per step (the larger), doubling when CPU or memory is saturated (a
//! saturated reading hides the real demand). Scale-down needs every weighted metric calm now (below its
//! `scale_down_threshold`), the highest recommendation of the last `scale_down_stabilization` (120 s) lower than the
//! current count, and a gate: each metric's mean over its `measurement_window` (the plan's 3-5 minutes) below its
//! `scale_down_threshold`, none missing. The stabilization and the windows run at the same time, so a burst is
//! forgotten after the longest window (3 minutes for request rate), well inside the plan's 5 minutes. Cooldowns after
//! each action, and `min_instances` / `max_instances` always hold.

use equilibrio_contract::FieldError;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::environment::Environment;
use crate::scaling::rate;

/// One metric's part in the decision (`SCALING_METRICS` in docs/configuration.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricPolicy {
    pub weight: f64,
    pub scale_up_threshold: f64,
    pub scale_down_threshold: f64,
    /// Seconds of history that must all be calm before scaling down.
    pub measurement_window: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Victim {
    /// The instance with the fewest requests in flight (then the newest).
    LeastLoaded,
    Newest,
}

/// A service's scaling policy (`ENVIRONMENTS` and `SCALING_METRICS` in docs/configuration.md, plus the timing of the
/// decision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingPolicy {
    pub enabled: bool,
    pub min_instances: u32,
    pub max_instances: u32,
    pub target_cpu_percent: f64,
    pub target_memory_percent: f64,
    pub cpu_utilization: MetricPolicy,
    pub memory_utilization: MetricPolicy,
    /// Requests per instance per minute (the plan's unit): a number, or a string with its unit, `"100/s"` or
    /// `"6000/min"` ([`rate`]). Shown as a number per minute.
    pub request_rate: MetricPolicy,
    /// Milliseconds (p95).
    pub response_time: MetricPolicy,
    /// Relative band around the target inside which nothing moves.
    pub tolerance: f64,
    /// Seconds of recent samples that scale-up decisions look at.
    pub scale_up_window: f64,
    /// Seconds a higher recommendation must hold before scaling up.
    pub scale_up_stabilization: f64,
    /// Seconds over which the highest recommendation bounds a scale-down.
    pub scale_down_stabilization: f64,
    /// Seconds after a scale-up before another scale-up.
    pub scale_up_cooldown: f64,
    /// Seconds after any scaling before a scale-down.
    pub scale_down_cooldown: f64,
    /// A new instance's weight ramps from 10% to full over this many seconds.
    pub slow_start: f64,
    /// Seconds a managed instance may take to pass its first health check, counted from its start, or from when this
    /// supervisor adopted it (a restart gives every instance a fresh grace); past it, it is replaced.
    pub start_timeout: f64,
    /// Seconds a managed instance that was healthy may stay unhealthy before it is replaced (drained, then stopped;
    /// one at a time).
    pub replace_unhealthy_after: f64,
    /// No replacement while more than this share of the service's running instances is unhealthy at once (a single
    /// unhealthy instance can always be replaced): that many failing together is the checker, the network or overload,
    /// not the containers, and replacing them would take the whole service down. An event says so instead.
    pub max_unhealthy_share: f64,
    pub victim: Victim,
    /// For the cost figures.
    pub price_per_instance_hour: f64,
}

impl ScalingPolicy {
    /// An environment profile's values (docs/configuration.md#environment-profiles-the-plans-environments).
    pub fn for_environment(env: Environment) -> ScalingPolicy {
        // request rate per instance, per minute: a search API instance serves tens to hundreds of requests a second
        // (`scripts/calibrate` measures yours); the plan's 100 per minute would keep any real service at its maximum
        let (min, max, cpu, mem, up, down, rate_up, rate_down) = match env {
            Environment::Production => (3, 20, 70.0, 80.0, 80.0, 30.0, 100.0 * 60.0, 25.0 * 60.0),
            Environment::Staging => (2, 10, 75.0, 85.0, 85.0, 40.0, 100.0 * 60.0, 25.0 * 60.0),
            Environment::Development => (1, 3, 80.0, 90.0, 90.0, 50.0, 100.0, 20.0),
        };
        ScalingPolicy {
            enabled: true,
            min_instances: min,
            max_instances: max,
            target_cpu_percent: cpu,
            target_memory_percent: mem,
            // the environment's thresholds are CPU's (the plan's production values coincide)
            cpu_utilization: MetricPolicy {
                weight: 0.3,
                scale_up_threshold: up,
                scale_down_threshold: down,
                measurement_window: 300.0,
            },
            memory_utilization: MetricPolicy {
                weight: 0.2,
                scale_up_threshold: 85.0,
                scale_down_threshold: 40.0,
                measurement_window: 300.0,
            },
            request_rate: MetricPolicy {
                weight: 0.3,
                scale_up_threshold: rate_up,
                scale_down_threshold: rate_down,
                measurement_window: 180.0,
            },
            response_time: MetricPolicy {
                weight: 0.2,
                scale_up_threshold: 2000.0,
                scale_down_threshold: 500.0,
                measurement_window: 180.0,
            },
            tolerance: 0.1,
            scale_up_window: 5.0,
            scale_up_stabilization: 3.0,
            scale_down_stabilization: 120.0,
            scale_up_cooldown: 5.0,
            scale_down_cooldown: 30.0,
            slow_start: 10.0,
            start_timeout: 60.0,
            replace_unhealthy_after: 30.0,
            max_unhealthy_share: 0.5,
            victim: Victim::LeastLoaded,
            price_per_instance_hour: 0.05,
        }
    }

    /// This policy with `overrides` (a partial policy, as in the configuration or a `PUT`) merged key by key, then
    /// validated. On error gives the field (dotted) and the reason.
    pub fn with_overrides(&self, overrides: Option<&serde_json::Value>) -> Result<ScalingPolicy, FieldError> {
        let Some(o) = overrides else {
            self.validate()?;
            return Ok(self.clone());
        };
        if !o.is_object() {
            return Err(FieldError::new("", "expected an object"));
        }
        let mut merged = serde_json::to_value(self).map_err(|e| FieldError::new("", e.to_string()))?;
        equilibrio_contract::keyed::merge(&mut merged, o);
        rate::normalize(&mut merged)?;
        let p: ScalingPolicy = equilibrio_contract::keyed::deserialize_keyed(&merged)?;
        p.validate()?;
        Ok(p)
    }

    /// Checks ranges; on error gives the field and the reason.
    pub fn validate(&self) -> Result<(), FieldError> {
        let e = |f: &str, r: &str| Err(FieldError::new(f, r));
        if self.max_instances < 1 || self.max_instances > 1000 {
            return e("max_instances", "must be between 1 and 1000");
        }
        if self.min_instances > self.max_instances {
            return e("min_instances", "must not exceed max_instances");
        }
        for (name, v) in
            [("target_cpu_percent", self.target_cpu_percent), ("target_memory_percent", self.target_memory_percent)]
        {
            if !(1.0..=100.0).contains(&v) {
                return e(name, "must be between 1 and 100");
            }
        }
        for (name, m) in self.metrics() {
            if !(0.0..=1.0).contains(&m.weight) || !m.weight.is_finite() {
                return Err(FieldError::new(format!("{name}.weight"), "must be between 0 and 1"));
            }
            if !(m.scale_down_threshold >= 0.0
                && m.scale_down_threshold < m.scale_up_threshold
                && m.scale_up_threshold.is_finite())
            {
                return Err(FieldError::new(
                    format!("{name}.scale_down_threshold"),
                    "must be at least 0 and below scale_up_threshold",
                ));
            }
            if !(1.0..=86_400.0).contains(&m.measurement_window) {
                return Err(FieldError::new(
                    format!("{name}.measurement_window"),
                    "must be between 1 and 86400 seconds",
                ));
            }
        }
        if self.metrics().iter().all(|(_, m)| m.weight == 0.0) {
            return e("cpu_utilization.weight", "at least one metric needs a weight above 0");
        }
        if !(0.0..0.5).contains(&self.tolerance) {
            return e("tolerance", "must be between 0 and 0.5");
        }
        for (name, v) in [
            ("scale_up_window", self.scale_up_window),
            ("scale_up_stabilization", self.scale_up_stabilization),
            ("scale_down_stabilization", self.scale_down_stabilization),
            ("scale_up_cooldown", self.scale_up_cooldown),
            ("scale_down_cooldown", self.scale_down_cooldown),
            ("slow_start", self.slow_start),
            ("start_timeout", self.start_timeout),
            ("replace_unhealthy_after", self.replace_unhealthy_after),
        ] {
            if !(0.0..=86_400.0).contains(&v) {
                return Err(FieldError::new(name, "must be between 0 and 86400 seconds"));
            }
        }
        if self.start_timeout < 1.0 {
            return e("start_timeout", "must be at least 1 second");
        }
        if self.replace_unhealthy_after < 1.0 {
            return e("replace_unhealthy_after", "must be at least 1 second");
        }
        if !(0.0..=1.0).contains(&self.max_unhealthy_share) {
            return e("max_unhealthy_share", "must be between 0 and 1");
        }
        if self.scale_up_window < 1.0 {
            return e("scale_up_window", "must be at least 1 second");
        }
        if !(0.0..=1e6).contains(&self.price_per_instance_hour) {
            return e("price_per_instance_hour", "must be between 0 and 1000000");
        }
        Ok(())
    }

    pub fn metrics(&self) -> [(&'static str, MetricPolicy); 4] {
        [
            ("cpu_utilization", self.cpu_utilization),
            ("memory_utilization", self.memory_utilization),
            ("request_rate", self.request_rate),
            ("response_time", self.response_time),
        ]
    }

    /// The value at which a metric counts as fully used (utilization 1.0).
    fn target(&self, metric: usize) -> f64 {
        match metric {
            0 => self.target_cpu_percent,
            1 => self.target_memory_percent,
            2 => self.request_rate.scale_up_threshold,
            _ => self.response_time.scale_up_threshold,
        }
    }
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        ScalingPolicy::for_environment(Environment::Development)
    }
}

/// One observation of a service (averages over its instances), taken by the controller every evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub at_ms: u64,
    /// In the order of [`ScalingPolicy::metrics`]: CPU %, memory %, requests per instance per minute, p95 ms.
    pub values: [Option<f64>; 4],
}

/// What the decision remembers between evaluations.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub samples: VecDeque<Sample>,
    /// (time, recommended count), for stabilization.
    pub recommendations: VecDeque<(u64, u32)>,
    pub last_scale_up_ms: Option<u64>,
    pub last_scale_ms: Option<u64>,
}

impl History {
    /// Records a sample, keeping what the longest window needs.
    pub fn record(&mut self, s: Sample, keep_ms: u64) {
        self.samples.push_back(s);
        let horizon = s.at_ms.saturating_sub(keep_ms);
        while self.samples.front().is_some_and(|x| x.at_ms < horizon) {
            self.samples.pop_front();
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    /// Why, for the scaling event: the metric, its value and the threshold or target it was measured against.
    pub reason: String,
}

/// The unit a metric's values are shown in (scaling events and the log).
fn unit(metric: usize) -> &'static str {
    match metric {
        0 | 1 => "%",
        2 => "/min",
        _ => " ms",
    }
}

/// CPU or memory at or above this is saturated.
const SATURATED: f64 = 95.0;

fn mean(samples: &VecDeque<Sample>, metric: usize, since_ms: u64) -> Option<f64> {
    let (sum, n) = samples
        .iter()
        .filter(|s| s.at_ms >= since_ms)
        .filter_map(|s| s.values.get(metric).copied().flatten())
        .fold((0.0, 0usize), |(sum, n), v| (sum + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Whether the samples cover the whole window for a metric (the oldest sample with a value is old enough).
fn covers(samples: &VecDeque<Sample>, metric: usize, since_ms: u64, tick_ms: u64) -> bool {
    samples
        .iter()
        .find(|s| s.values.get(metric).copied().flatten().is_some())
        .is_some_and(|s| s.at_ms <= since_ms + tick_ms)
}

fn secs(s: f64) -> u64 {
    (s * 1000.0) as u64
}

/// Decides the instance count for a service now running `current`. `tick_ms` is the evaluation period (the slack
/// allowed when checking that samples cover a window). Updates `h` (recommendations, scale times) when it decides.
pub fn decide(p: &ScalingPolicy, current: u32, h: &mut History, now_ms: u64, tick_ms: u64) -> Decision {
    let clamp = |n: u32| n.clamp(p.min_instances, p.max_instances);
    if current < p.min_instances || current > p.max_instances {
        let desired = clamp(current);
        return Decision {
            desired,
            reason: format!("keep within min {} and max {}", p.min_instances, p.max_instances),
        };
    }
    if !p.enabled {
        return Decision { desired: current, reason: "scaling disabled".into() };
    }
    let cur = f64::from(current.max(1));
    let metrics = p.metrics();

    // ---- recommendation for going up: recent values
    let up_since = now_ms.saturating_sub(secs(p.scale_up_window));
    let mut weighted = 0.0;
    let mut weights = 0.0;
    let mut up = current;
    let mut reason = String::from("within tolerance");
    for (i, (name, m)) in metrics.iter().enumerate() {
        let Some(v) = mean(&h.samples, i, up_since) else { continue };
        let target = p.target(i);
        if m.weight > 0.0 {
            weighted += m.weight * v / target;
            weights += m.weight;
        }
        // a metric weighted 0 is left out of the decision altogether, its emergency threshold included
        if m.weight > 0.0 && v > m.scale_up_threshold {
            let mut want = ((cur * v / target).ceil() as u32).max(current + 1);
            // a saturated utilization hides the real demand (it cannot read above 100%): double instead
            if i < 2 && v >= SATURATED {
                want = want.max(current.saturating_mul(2));
            }
            if want > up {
                up = want;
                let unit = unit(i);
                reason = format!("{name} {v:.1}{unit} above scale_up_threshold {}{unit}", m.scale_up_threshold);
            }
        }
    }
    if weights > 0.0 {
        let utilization = weighted / weights;
        if utilization > 1.0 + p.tolerance {
            let want = (cur * utilization).ceil() as u32;
            if want > up {
                up = want;
                reason = format!("weighted utilization {:.2} of target (tolerance {})", utilization, p.tolerance);
            }
        }
    }

    // ---- recommendation for going down: from recent values, like the one for going up; it must hold over the
    // stabilization window, and a gate must be open: every weighted metric's mean over its measurement_window below
    // its scale_down_threshold, none missing. The two run at the same time, so a short burst is forgotten after the
    // longest window, not after the window plus the stabilization.
    let mut down = current;
    // calm now: every weighted metric's recent value below its scale_down_threshold
    let calm_now = metrics
        .iter()
        .enumerate()
        .filter(|(_, (_, m))| m.weight > 0.0)
        .all(|(i, (_, m))| mean(&h.samples, i, up_since).is_some_and(|v| v < m.scale_down_threshold));
    let missing_now = metrics
        .iter()
        .enumerate()
        .find(|(i, (_, m))| m.weight > 0.0 && mean(&h.samples, *i, up_since).is_none())
        .map(|(_, (name, _))| *name);
    if let Some(name) = missing_now
        && up == current
    {
        reason = format!("no scale-down: {name} has no data over its measurement_window");
    }
    if weights > 0.0 && up == current && calm_now {
        let utilization = weighted / weights;
        if utilization < 1.0 - p.tolerance {
            down = ((cur * utilization).ceil() as u32).max(1).min(current);
        }
    }
    let history_ms = h.samples.front().map_or(0, |s| now_ms.saturating_sub(s.at_ms));
    let mut gate: Result<f64, String> = Ok(0.0);
    let mut gate_weights = 0.0;
    for (i, (name, m)) in metrics.iter().enumerate() {
        if m.weight == 0.0 {
            continue;
        }
        let since = now_ms.saturating_sub(secs(m.measurement_window));
        // enough data: the whole window, or (after a restart) at least the stabilization window of it
        let enough = covers(&h.samples, i, since, tick_ms) || history_ms + tick_ms >= secs(p.scale_down_stabilization);
        gate = match (gate, mean(&h.samples, i, since)) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(v)) if !enough => Err(format!("{name} has {v:.1} over only part of its measurement_window")),
            (Ok(_), None) => Err(format!("{name} has no data over its measurement_window")),
            (Ok(_), Some(v)) if v >= m.scale_down_threshold => {
                let unit = unit(i);
                Err(format!(
                    "{name} {v:.1}{unit} not below scale_down_threshold {}{unit} over its window",
                    m.scale_down_threshold
                ))
            }
            (Ok(acc), Some(v)) => {
                gate_weights += m.weight;
                Ok(acc + m.weight * v / p.target(i))
            }
        };
    }
    if down < current {
        match &gate {
            Ok(sum) if gate_weights > 0.0 => {
                reason = format!(
                    "every metric below its scale_down_threshold; weighted utilization {:.2}",
                    sum / gate_weights
                );
            }
            Ok(_) => {}
            Err(why) => reason = format!("no scale-down: {why}"),
        }
    }

    let recommended = clamp(if up > current { up } else { down });
    h.recommendations.push_back((now_ms, recommended));
    let keep = secs(p.scale_down_stabilization.max(p.scale_up_stabilization));
    while h.recommendations.front().is_some_and(|(t, _)| *t + keep < now_ms) {
        h.recommendations.pop_front();
    }

    let mut desired = current;
    if recommended > current {
        // stabilization: the lowest recommendation of the last few seconds must still be higher
        let since = now_ms.saturating_sub(secs(p.scale_up_stabilization));
        let held = h.recommendations.iter().filter(|(t, _)| *t >= since).map(|(_, r)| *r).min().unwrap_or(current);
        let oldest_in_window = h.recommendations.iter().find(|(t, _)| *t >= since).map(|(t, _)| *t).unwrap_or(now_ms);
        let long_enough = now_ms.saturating_sub(oldest_in_window) + tick_ms >= secs(p.scale_up_stabilization);
        let cooled = h.last_scale_up_ms.is_none_or(|t| now_ms.saturating_sub(t) >= secs(p.scale_up_cooldown));
        if held > current && long_enough && cooled {
            let step = current.max(4);
            desired = clamp(held.min(current.saturating_add(step)));
        } else if held > current {
            reason = format!("{reason}; waiting for stabilization or cooldown");
        }
    } else if recommended < current {
        let since = now_ms.saturating_sub(secs(p.scale_down_stabilization));
        let highest = h.recommendations.iter().filter(|(t, _)| *t >= since).map(|(_, r)| *r).max().unwrap_or(current);
        let cooled = h.last_scale_ms.is_none_or(|t| now_ms.saturating_sub(t) >= secs(p.scale_down_cooldown));
        // the stabilization must cover its whole window (a fresh history does not count as stable)
        let stable_long_enough = history_ms + tick_ms >= secs(p.scale_down_stabilization);
        if highest < current && cooled && stable_long_enough && gate.is_ok() {
            desired = clamp(highest);
        } else if gate.is_ok() {
            reason = format!("{reason}; waiting for the scale-down stabilization window");
        }
    }
    if desired > current {
        h.last_scale_up_ms = Some(now_ms);
    }
    if desired != current {
        h.last_scale_ms = Some(now_ms);
    }
    Decision { desired, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: u64 = 1000;

    fn policy() -> ScalingPolicy {
        ScalingPolicy { min_instances: 1, max_instances: 10, ..ScalingPolicy::for_environment(Environment::Production) }
    }

    fn sample(t: u64, cpu: f64) -> Sample {
        // memory flat at 30%, requests and latency calm
        Sample { at_ms: t, values: [Some(cpu), Some(30.0), Some(10.0), Some(50.0)] }
    }

    /// Runs a trace of offered CPU load (in "percent of one instance") through the decision, with the count
    /// applied at once; returns the counts over time.
    fn simulate(p: &ScalingPolicy, start: u32, load: impl Fn(u64) -> f64, seconds: u64) -> Vec<u32> {
        let mut h = History::default();
        let mut n = start;
        let mut out = Vec::new();
        for s in 0..seconds {
            let t = s * 1000;
            let cpu = (load(t) / f64::from(n)).min(100.0);
            h.record(sample(t, cpu), 600_000);
            n = decide(p, n, &mut h, t, TICK).desired;
            out.push(n);
        }
        out
    }

    #[test]
    fn a_step_load_reaches_the_needed_size_quickly() {
        let p = policy();
        // 300% of one instance: 4 instances run at 75%, within the 10% tolerance of the 70% target
        let counts = simulate(&p, 1, |t| if t < 10_000 { 20.0 } else { 300.0 }, 60);
        let first = counts.iter().position(|&n| n > 1).expect("scales up");
        assert!(first <= 10 + 8, "first scale-up {} s after the step: {counts:?}", first as i64 - 10);
        let reached = counts.iter().position(|&n| n >= 4).expect("reaches 4");
        assert!(reached <= 10 + 15, "reached 4 instances {} s after the step: {counts:?}", reached as i64 - 10);
        assert_eq!(*counts.last().unwrap(), 4, "no overshoot: {counts:?}");
    }

    #[test]
    fn noise_around_the_target_causes_no_flapping() {
        let p = policy();
        // 4 instances at about 70% each, +-8 points of noise
        let noise = |t: u64| 280.0 + 32.0 * ((t / 1000) as f64 * 1.7).sin();
        let counts = simulate(&p, 4, noise, 900);
        assert!(
            counts.iter().all(|&n| n == 4),
            "changed: {:?}",
            counts.iter().collect::<std::collections::BTreeSet<_>>()
        );
    }

    #[test]
    fn scale_down_waits_for_calm_windows_then_goes_down() {
        let p = policy();
        // busy for a minute, then almost idle
        let counts = simulate(&p, 1, |t| if t < 60_000 { 300.0 } else { 5.0 }, 900);
        let top = *counts.iter().max().unwrap();
        assert!(top >= 4);
        let first_down = counts.iter().enumerate().skip(60).find(|(_, n)| **n < top).map(|(i, _)| i).unwrap();
        // the mean over the 300 s CPU window must fall below 30%, and the 120 s stabilization pass, first
        assert!(first_down >= 60 + 120, "scaled down {first_down} s in");
        assert_eq!(*counts.last().unwrap(), 1, "{counts:?}");
    }

    #[test]
    fn no_scale_down_while_a_metric_is_missing() {
        let p = policy();
        let mut h = History::default();
        for s in 0..600u64 {
            h.record(Sample { at_ms: s * 1000, values: [Some(5.0), Some(10.0), None, Some(1.0)] }, 600_000);
            let d = decide(&p, 5, &mut h, s * 1000, TICK);
            assert_eq!(d.desired, 5);
        }
        let d = decide(&p, 5, &mut h, 600_000, TICK);
        assert!(d.reason.contains("request_rate has no data"), "{}", d.reason);
    }

    #[test]
    fn min_and_max_hold_and_steps_are_bounded() {
        let p = ScalingPolicy { min_instances: 2, max_instances: 6, ..policy() };
        let mut h = History::default();
        assert_eq!(decide(&p, 0, &mut h, 0, TICK).desired, 2);
        assert_eq!(decide(&p, 9, &mut h, 0, TICK).desired, 6);
        let counts = simulate(&p, 2, |_| 5000.0, 60);
        assert!(counts.iter().all(|&n| (2..=6).contains(&n)));
        assert_eq!(*counts.last().unwrap(), 6);
        // +100% or +4 per step at most
        let big = ScalingPolicy { max_instances: 1000, ..policy() };
        let counts = simulate(&big, 1, |_| 100_000.0, 30);
        for w in counts.windows(2) {
            assert!(w[1] <= w[0] + w[0].max(4), "{counts:?}");
        }
        let idle = simulate(&p, 6, |_| 0.0, 900);
        assert!(idle.iter().all(|&n| n >= 2));
    }

    #[test]
    fn an_emergency_metric_scales_up_alone() {
        let p = policy();
        let mut h = History::default();
        let mut n = 2;
        for s in 0..20u64 {
            // CPU calm, but p95 far above its 2000 ms threshold
            h.record(Sample { at_ms: s * 1000, values: [Some(40.0), Some(30.0), Some(50.0), Some(4000.0)] }, 600_000);
            let d = decide(&p, n, &mut h, s * 1000, TICK);
            if d.desired > n {
                assert!(d.reason.contains("response_time"), "{}", d.reason);
            }
            n = d.desired;
        }
        assert!(n > 2);
    }

    #[test]
    fn a_metric_weighted_zero_plays_no_part() {
        let mut p = policy();
        p.response_time.weight = 0.0;
        let mut h = History::default();
        for s in 0..20u64 {
            // p95 far above its threshold, but weighted 0: nothing moves
            h.record(Sample { at_ms: s * 1000, values: [Some(40.0), Some(30.0), Some(50.0), Some(4000.0)] }, 600_000);
            assert_eq!(decide(&p, 2, &mut h, s * 1000, TICK).desired, 2);
        }
    }

    #[test]
    fn request_rates_take_their_unit() {
        let dev = ScalingPolicy::for_environment(Environment::Development);
        let o = serde_json::json!({"request_rate": {"scale_up_threshold": "50/s", "scale_down_threshold": "600/min"}});
        let p = dev.with_overrides(Some(&o)).unwrap();
        assert_eq!((p.request_rate.scale_up_threshold, p.request_rate.scale_down_threshold), (3000.0, 600.0));
        let o = serde_json::json!({"request_rate": {"scale_up_threshold": "50/h"}});
        assert_eq!(dev.with_overrides(Some(&o)).unwrap_err().key, "request_rate.scale_up_threshold");
        // only request_rate has a unit
        let o = serde_json::json!({"cpu_utilization": {"scale_up_threshold": "50/s"}});
        assert_eq!(dev.with_overrides(Some(&o)).unwrap_err().key, "cpu_utilization.scale_up_threshold");
        for (key, v) in [("start_timeout", 0.5), ("replace_unhealthy_after", 0.0), ("max_unhealthy_share", 1.5)] {
            let o = serde_json::json!({ key: v });
            assert_eq!(dev.with_overrides(Some(&o)).unwrap_err().key, key);
        }
    }

    #[test]
    fn plan_defaults_and_validation() {
        let prod = ScalingPolicy::for_environment(Environment::Production);
        assert_eq!((prod.min_instances, prod.max_instances), (3, 20));
        assert_eq!(prod.target_cpu_percent, 70.0);
        // per instance per minute: 100 a second in production, the plan's 100 a minute in development
        assert_eq!(prod.request_rate.scale_up_threshold, 6000.0);
        assert_eq!(prod.cpu_utilization.measurement_window, 300.0);
        let dev = ScalingPolicy::for_environment(Environment::Development);
        assert_eq!((dev.min_instances, dev.max_instances), (1, 3));
        assert_eq!(dev.request_rate.scale_up_threshold, 100.0);
        assert_eq!((prod.start_timeout, prod.replace_unhealthy_after, prod.max_unhealthy_share), (60.0, 30.0, 0.5));
        prod.validate().unwrap();
        let bad = ScalingPolicy { min_instances: 5, max_instances: 2, ..prod.clone() };
        assert_eq!(bad.validate().unwrap_err().key, "min_instances");
        let mut bad = prod.clone();
        bad.request_rate.scale_down_threshold = 7000.0;
        assert_eq!(bad.validate().unwrap_err().key, "request_rate.scale_down_threshold");
    }
}
