//! The autoscaler's memory for one service, owned by the scaling module: the metric history the policy decides on,
//! the decisions and failures it recorded (what `GET .../scaling/events` shows), the crash-loop backoff, a manual
//! hold, the episode where replacements are held, and the cost figures. Plain data with the transitions as methods
//! taking `now`: the control loop (`controller.rs`) and the API call them, neither edits fields by hand.

use std::collections::VecDeque;

use serde::Serialize;

use crate::scaling::cost::{CostStats, Observation};
use crate::scaling::policy::{History, Sample};
use crate::scaling::runtime::Template;

/// Decisions and failures kept per service (the oldest go first).
const HISTORY_EVENTS: usize = 500;
/// A failure streak is forgiven after this long without a new failure, once the service runs what it should.
const FORGIVE_AFTER_MS: u64 = 60_000;

/// What a scaling event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScalingEventKind {
    ScaleUp,
    ScaleDown,
    Manual,
    /// A container could not be created (Docker's message in the reason).
    Failed,
    /// A container died, or stayed unhealthy too long, and was replaced.
    Replaced,
    /// Too much of the service was unhealthy at once: replacements wait.
    ReplacementsHeld,
    /// A Swarm service's replicas were changed by someone else (`from` what we had set, `to` what was found).
    ChangedOutside,
}

impl ScalingEventKind {
    /// The name on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ScalingEventKind::ScaleUp => "scale_up",
            ScalingEventKind::ScaleDown => "scale_down",
            ScalingEventKind::Manual => "manual",
            ScalingEventKind::Failed => "failed",
            ScalingEventKind::Replaced => "replaced",
            ScalingEventKind::ReplacementsHeld => "replacements_held",
            ScalingEventKind::ChangedOutside => "changed_outside",
        }
    }
}

impl PartialEq<&str> for ScalingEventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One scaling decision or failure, as `GET /v1/services/{service}/scaling/events` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ScalingEvent {
    pub time_ms: u64,
    pub kind: ScalingEventKind,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// A change of the replacements-held episode, for the caller to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Episode {
    /// It starts: the alert, with its reason.
    Held {
        reason: String,
    },
    Resumed,
}

/// The autoscaler's memory for one service.
pub struct ScalingState {
    pub template: Template,
    pub history: History,
    pub events: VecDeque<ScalingEvent>,
    pub failures: u32,
    pub backoff_until_ms: u64,
    /// A manual scale holds the count until then.
    pub hold_until_ms: u64,
    pub manual_desired: Option<u32>,
    pub current: u32,
    pub desired: u32,
    /// A Swarm service's replica count as this supervisor last set or adopted it (`None` until its first round as
    /// leader, which adopts the count as it is): a different count read back was changed by someone else.
    pub swarm_replicas: Option<u32>,
    /// The count the last decision (or manual scale) asked of a Swarm service. The policy answers "no change" with
    /// the running count, which for Swarm is not the count to set (tasks start, drained ones still run): this holds
    /// the target between decisions.
    pub swarm_target: Option<u32>,
    pub cost: CostStats,
    last_failure_ms: u64,
    /// Replacements are held (too much of the service unhealthy at once): the episode's event was published.
    replacements_held: bool,
    /// When the last such episode ended.
    replacements_resumed_ms: u64,
}

impl ScalingState {
    pub fn new(template: Template) -> ScalingState {
        ScalingState {
            template,
            history: History::default(),
            events: VecDeque::new(),
            failures: 0,
            backoff_until_ms: 0,
            hold_until_ms: 0,
            manual_desired: None,
            current: 0,
            desired: 0,
            swarm_replicas: None,
            swarm_target: None,
            cost: CostStats::default(),
            last_failure_ms: 0,
            replacements_held: false,
            replacements_resumed_ms: 0,
        }
    }

    /// A Swarm service's replica count found changed by someone else: recorded, and adopted as the count we know.
    pub fn changed_outside(&mut self, time_ms: u64, from: u32, to: u32) {
        self.swarm_replicas = Some(to);
        self.swarm_target = Some(to);
        self.record(
            time_ms,
            ScalingEventKind::ChangedOutside,
            from,
            to,
            "replicas changed outside the supervisor".into(),
        );
    }

    fn record(&mut self, time_ms: u64, kind: ScalingEventKind, from: u32, to: u32, reason: String) {
        tracing::info!(kind = kind.as_str(), from, to, %reason, "scaling");
        if self.events.len() >= HISTORY_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ScalingEvent { time_ms, kind, from, to, reason });
    }

    /// One round's observation: the sample for the policy (kept for `keep_ms`) and the cost accounting. The
    /// instance-seconds it adds.
    pub fn observe(&mut self, sample: Sample, keep_ms: u64, observation: Observation) -> f64 {
        self.history.record(sample, keep_ms);
        self.cost.observe(observation)
    }

    /// Forgives a failure streak once the service has run what it should for a while without a new one.
    pub fn forgive_failures(&mut self, now: u64, serving: u32, current: u32) {
        if self.failures > 0 && now.saturating_sub(self.last_failure_ms) > FORGIVE_AFTER_MS && serving >= current {
            self.failures = 0;
        }
    }

    /// The count a manual scale holds, while it holds.
    pub fn manual_target(&self, now: u64) -> Option<u32> {
        self.manual_desired.filter(|_| now < self.hold_until_ms)
    }

    /// A manual scale: run `instances`, held for `hold_ms`.
    pub fn hold_manual(&mut self, instances: u32, hold_ms: u64, now: u64) {
        self.manual_desired = Some(instances);
        self.hold_until_ms = now + hold_ms;
        let from = self.current;
        self.record(
            now,
            ScalingEventKind::Manual,
            from,
            instances,
            format!("manual scale, held for {} s", hold_ms / 1000),
        );
    }

    /// Takes the round's decision: a new one (not the one already under way) is recorded, and its kind returned
    /// for the caller to count and publish.
    pub fn decide(&mut self, now: u64, current: u32, desired: u32, reason: &str) -> Option<ScalingEventKind> {
        let decided = (desired != current && desired != self.desired).then(|| {
            let kind = if desired > current { ScalingEventKind::ScaleUp } else { ScalingEventKind::ScaleDown };
            if desired > current {
                self.cost.scale_ups += 1;
            } else {
                self.cost.scale_downs += 1;
            }
            self.record(now, kind, current, desired, reason.to_string());
            kind
        });
        self.current = current;
        self.desired = desired;
        decided
    }

    /// A failure (a create that failed, a container replaced): recorded as `kind`, and it feeds the crash-loop
    /// backoff (1 s doubling to 5 min).
    pub fn failed(&mut self, now: u64, kind: ScalingEventKind, reason: String) {
        self.failures = self.failures.saturating_add(1);
        self.cost.failures += 1;
        self.last_failure_ms = now;
        let backoff = 1000u64.saturating_mul(1 << self.failures.min(9).saturating_sub(1)).min(300_000);
        self.backoff_until_ms = now + backoff;
        let (from, to) = (self.current, self.desired);
        self.record(now, kind, from, to, reason);
    }

    /// Where an instance's failing time counts from: time while replacements are held does not count.
    pub fn failing_counts_from_ms(&self, now: u64) -> u64 {
        if self.replacements_held { now } else { self.replacements_resumed_ms }
    }

    /// Follows the replacements-held episode: `held` is the planner's (unhealthy, running) when it holds them. The
    /// start and the end are returned once each, not every round.
    pub fn replacements(&mut self, held: Option<(u32, u32)>, now: u64) -> Option<Episode> {
        match held {
            Some((unhealthy, running)) if !self.replacements_held => {
                self.replacements_held = true;
                let reason = format!(
                    "{unhealthy} of {running} instances unhealthy at once: replacements held (the health checks, the network or overload, not the containers?)"
                );
                let (from, to) = (self.current, self.desired);
                self.record(now, ScalingEventKind::ReplacementsHeld, from, to, reason.clone());
                Some(Episode::Held { reason })
            }
            None if self.replacements_held => {
                self.replacements_held = false;
                self.replacements_resumed_ms = now;
                Some(Episode::Resumed)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ScalingState {
        let t = Template {
            image: "i".into(),
            command: vec![],
            env: vec![],
            port: 8080,
            labels: Default::default(),
            cpus: None,
            memory_mb: None,
            network: None,
            stop_grace: 10,
            adopt_unsigned: false,
            mode: Default::default(),
            placement: Default::default(),
            zone_label: String::new(),
            node_apis: Default::default(),
        };
        ScalingState::new(t)
    }

    #[test]
    fn failures_back_off_exponentially_and_are_forgiven_after_a_quiet_minute() {
        let mut s = state();
        for (i, want) in [1000, 2000, 4000, 8000].into_iter().enumerate() {
            s.failed(10_000, ScalingEventKind::Failed, format!("f{i}"));
            assert_eq!(s.backoff_until_ms - 10_000, want);
        }
        s.forgive_failures(10_000 + FORGIVE_AFTER_MS, 2, 2);
        assert_eq!(s.failures, 4, "not yet");
        s.forgive_failures(10_001 + FORGIVE_AFTER_MS, 1, 2);
        assert_eq!(s.failures, 4, "not while short of instances");
        s.forgive_failures(10_001 + FORGIVE_AFTER_MS, 2, 2);
        assert_eq!(s.failures, 0);
        assert_eq!(s.events.len(), 4);
    }

    #[test]
    fn a_decision_is_recorded_once_and_a_manual_hold_expires() {
        let mut s = state();
        assert_eq!(s.decide(1, 1, 3, "cpu"), Some(ScalingEventKind::ScaleUp));
        assert_eq!(s.decide(2, 2, 3, "cpu"), None, "the same decision, under way");
        assert_eq!(s.decide(3, 3, 1, "idle"), Some(ScalingEventKind::ScaleDown));
        s.hold_manual(2, 1000, 10);
        assert_eq!((s.manual_target(500), s.manual_target(1010)), (Some(2), None));
        let kinds: Vec<&str> = s.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["scale_up", "scale_down", "manual"]);
    }

    #[test]
    fn the_held_episode_is_reported_at_its_start_and_end_only() {
        let mut s = state();
        assert!(matches!(s.replacements(Some((3, 4)), 5), Some(Episode::Held { .. })));
        assert_eq!(s.replacements(Some((3, 4)), 6), None);
        assert_eq!(s.failing_counts_from_ms(7), 7, "time held does not count");
        assert_eq!(s.replacements(None, 8), Some(Episode::Resumed));
        assert_eq!(s.replacements(None, 9), None);
        assert_eq!(s.failing_counts_from_ms(10), 8);
    }
}
