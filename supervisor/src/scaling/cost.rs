//! Cost accounting for one service: instance-seconds, the time-weighted CPU and memory use of its instances, the
//! requests they served, and from those the cost per request and the utilization efficiency.
//!
//! Measured, not counted: every observation carries a monotonic timestamp, and the interval since the previous one is
//! charged at the number of instances running during it (the previous observation's count), so a slow round (Docker's
//! stats take about a second each) or a pause costs what it really did. Averages are weighted by the time each reading
//! stood for, not by the number of readings.

use serde::Serialize;

/// Running totals for the cost and efficiency figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CostStats {
    /// Seconds of running instances (starting, serving or draining: all of them cost), from wall-clock intervals.
    pub instance_seconds: f64,
    /// Mean CPU use (% of each instance's limit), weighted by time.
    pub cpu_percent_avg: f64,
    pub cpu_percent_peak: f64,
    /// Mean memory use (% of the limit), weighted by time.
    pub memory_percent_avg: f64,
    pub memory_percent_peak: f64,
    /// Observations taken.
    pub samples: u64,
    /// Seconds covered by the observations so far.
    pub observed_seconds: f64,
    /// Requests served (the proxies' reported rate integrated over time).
    pub requests: u64,
    pub scale_ups: u64,
    pub scale_downs: u64,
    pub failures: u64,
    #[serde(skip)]
    last: Option<Observation>,
    #[serde(skip)]
    cpu_seconds: f64,
    #[serde(skip)]
    memory_seconds: f64,
    #[serde(skip)]
    requests_exact: f64,
}

/// What one observation saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Monotonic time of the observation (ms; any origin, it only has to be monotonic).
    pub at_mono_ms: u64,
    /// Instances running now.
    pub running: usize,
    pub cpu_percent: Option<f64>,
    pub memory_percent: Option<f64>,
    /// The service's request rate now (requests per second, all instances).
    pub requests_per_second: f64,
}

impl CostStats {
    /// Accounts the interval since the previous observation (the first one only starts the clock); returns the
    /// instance-seconds it added.
    pub fn observe(&mut self, o: Observation) -> f64 {
        self.samples += 1;
        if let Some(v) = o.cpu_percent {
            self.cpu_percent_peak = self.cpu_percent_peak.max(v);
        }
        if let Some(v) = o.memory_percent {
            self.memory_percent_peak = self.memory_percent_peak.max(v);
        }
        let added = match self.last {
            // the interval is charged at what stood during it: the previous observation's readings
            Some(prev) if o.at_mono_ms >= prev.at_mono_ms => {
                let dt = (o.at_mono_ms - prev.at_mono_ms) as f64 / 1000.0;
                let added = prev.running as f64 * dt;
                self.instance_seconds += added;
                if let Some(v) = prev.cpu_percent {
                    self.cpu_percent_avg = weighted(self.cpu_percent_avg, self.cpu_seconds, v, dt);
                    self.cpu_seconds += dt;
                }
                if let Some(v) = prev.memory_percent {
                    self.memory_percent_avg = weighted(self.memory_percent_avg, self.memory_seconds, v, dt);
                    self.memory_seconds += dt;
                }
                self.requests_exact += prev.requests_per_second.max(0.0) * dt;
                self.requests = self.requests_exact.round() as u64;
                self.observed_seconds += dt;
                added
            }
            _ => 0.0,
        };
        self.last = Some(o);
        added
    }

    /// Cost per request at `price` per instance-hour.
    pub fn cost_per_request(&self, price: f64) -> f64 {
        if self.requests == 0 { 0.0 } else { self.instance_seconds / 3600.0 * price / self.requests as f64 }
    }

    /// Used over allocated capacity: the time-weighted mean CPU utilization of the instances' limits.
    pub fn efficiency(&self) -> f64 {
        (self.cpu_percent_avg / 100.0).clamp(0.0, 1.0)
    }
}

fn weighted(avg: f64, seconds: f64, v: f64, dt: f64) -> f64 {
    if seconds + dt <= 0.0 { avg } else { (avg * seconds + v * dt) / (seconds + dt) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(at_mono_ms: u64, running: usize, cpu: f64, rps: f64) -> Observation {
        Observation {
            at_mono_ms,
            running,
            cpu_percent: Some(cpu),
            memory_percent: Some(cpu / 2.0),
            requests_per_second: rps,
        }
    }

    #[test]
    fn instance_seconds_follow_the_clock_not_the_number_of_rounds() {
        // rounds of 2 s (Docker's stats were slow) with 3 instances: 3 x 10 s, whatever the count of rounds
        let mut c = CostStats::default();
        for t in (0..=10_000).step_by(2000) {
            c.observe(obs(t, 3, 50.0, 0.0));
        }
        assert!((c.instance_seconds - 30.0).abs() < 1e-9, "{}", c.instance_seconds);
        let mut fine = CostStats::default();
        for t in (0..=10_000).step_by(500) {
            fine.observe(obs(t, 3, 50.0, 0.0));
        }
        assert!((fine.instance_seconds - c.instance_seconds).abs() < 1e-9);
        assert!((c.observed_seconds - 10.0).abs() < 1e-9);
    }

    #[test]
    fn an_interval_is_charged_at_what_ran_during_it() {
        let mut c = CostStats::default();
        c.observe(obs(0, 1, 10.0, 100.0));
        c.observe(obs(4000, 3, 90.0, 300.0)); // 1 instance for 4 s at 100 req/s
        c.observe(obs(5000, 3, 90.0, 300.0)); // 3 instances for 1 s at 300 req/s
        assert!((c.instance_seconds - 7.0).abs() < 1e-9);
        assert_eq!(c.requests, 700);
        // CPU: 10% for 4 s, 90% for 1 s -> 26%, not the mean of the readings (63%)
        assert!((c.cpu_percent_avg - 26.0).abs() < 1e-9, "{}", c.cpu_percent_avg);
        assert!((c.memory_percent_avg - 13.0).abs() < 1e-9);
        assert_eq!(c.cpu_percent_peak, 90.0);
        assert!((c.cost_per_request(3600.0) - 7.0 / 700.0).abs() < 1e-12);
        assert!((c.efficiency() - 0.26).abs() < 1e-9);
    }

    #[test]
    fn the_first_observation_only_starts_the_clock_and_time_never_runs_back() {
        let mut c = CostStats::default();
        assert_eq!(c.observe(obs(5000, 4, 50.0, 10.0)), 0.0);
        assert_eq!(c.observe(obs(4000, 4, 50.0, 10.0)), 0.0, "a clock going back charges nothing");
        assert_eq!(c.observe(obs(5000, 4, 50.0, 10.0)), 4.0);
        assert_eq!(c.cost_per_request(1.0), 4.0 / 3600.0 / 10.0);
        assert_eq!(CostStats::default().cost_per_request(1.0), 0.0);
    }
}
