//! `equilibrio-calibrate`: measures the request rate one instance sustains at the p95 target, with an open-loop load
//! ramp, and prints the `request_rate` thresholds to set (`scripts/calibrate` runs it against the demo image, or any
//! URL). The analysis is `equilibrio_supervisor::scaling::calibration`; this file only sends the load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use equilibrio_supervisor::scaling::calibration::{self, Step};

#[derive(Parser)]
#[command(about = "Measure one instance's sustainable request rate at a p95 target and print the scaling thresholds")]
struct Args {
    /// The instance's URL (one instance, not a proxy in front of several).
    #[arg(long)]
    url: String,
    /// The p95 target, in milliseconds (our users' target: 500, docs/configuration.md).
    #[arg(long, default_value_t = 500.0)]
    p95_ms: f64,
    /// First rate of the ramp, requests per second.
    #[arg(long, default_value_t = 5.0)]
    start: f64,
    /// Each step's rate over the last.
    #[arg(long, default_value_t = 1.25)]
    factor: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 5.0)]
    step_seconds: f64,
    /// The ramp stops here even if the instance keeps up.
    #[arg(long, default_value_t = 20_000.0)]
    max_rate: f64,
    /// Requests outstanding at once; beyond it a request counts as failed (the instance is not keeping up).
    #[arg(long, default_value_t = 2000)]
    max_outstanding: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if !(args.factor > 1.0 && args.start > 0.0 && args.step_seconds >= 1.0 && args.p95_ms > 0.0) {
        eprintln!(
            "equilibrio-calibrate: --factor must be above 1, --start and --p95-ms above 0, --step-seconds at least 1"
        );
        return std::process::ExitCode::FAILURE;
    }
    let timeout = Duration::from_millis((args.p95_ms * 10.0).max(5000.0) as u64);
    let client = match reqwest::Client::builder().timeout(timeout).pool_max_idle_per_host(512).build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("equilibrio-calibrate: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("{:>10} {:>10} {:>8} {:>8} {:>9}  holds", "offered/s", "served/s", "errors", "p95 ms", "sent");
    let mut steps = Vec::new();
    let mut rate = args.start;
    while rate <= args.max_rate {
        let step = run_step(&client, &args, rate).await;
        let holds = step.holds(args.p95_ms);
        println!(
            "{:>10.1} {:>10.1} {:>8} {:>8.1} {:>9}  {}",
            step.offered_per_second,
            step.completed as f64 / step.seconds,
            step.errors,
            step.p95_ms,
            step.sent,
            if holds { "yes" } else { "no" }
        );
        steps.push(step);
        if !holds {
            break;
        }
        rate = calibration::next_rate(rate, args.factor);
    }
    let Some(c) = calibration::calibrate(&steps, args.p95_ms) else {
        eprintln!(
            "equilibrio-calibrate: even {:.1} requests/s missed the p95 target of {} ms",
            args.start, args.p95_ms
        );
        return std::process::ExitCode::FAILURE;
    };
    println!();
    println!("sustainable_rate_per_second={:.1}", c.sustainable_per_second);
    println!("p95_target_ms={}", args.p95_ms);
    println!("scale_up_threshold_per_second={:.1}", c.scale_up_per_second);
    println!("scale_down_threshold_per_second={:.1}", c.scale_down_per_second);
    println!();
    println!("# in the service's `scaling` (supervisor config, or PUT /v1/services/<service>/scaling):");
    println!(
        "request_rate: {{scale_up_threshold: \"{:.1}/s\", scale_down_threshold: \"{:.1}/s\"}}",
        c.scale_up_per_second, c.scale_down_per_second
    );
    std::process::ExitCode::SUCCESS
}

/// Offers `rate` requests per second for one step; latencies count from when each request was due.
async fn run_step(client: &reqwest::Client, args: &Args, rate: f64) -> Step {
    let total = (rate * args.step_seconds).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let outstanding = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        if outstanding.load(Ordering::SeqCst) >= args.max_outstanding {
            errors.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        outstanding.fetch_add(1, Ordering::SeqCst);
        let (client, url) = (client.clone(), args.url.clone());
        let (outstanding, errors, latencies) = (outstanding.clone(), errors.clone(), latencies.clone());
        tasks.spawn(async move {
            let ok = match client.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                if let Ok(mut l) = latencies.lock() {
                    l.push(due.elapsed().as_secs_f64() * 1000.0);
                }
            } else {
                errors.fetch_add(1, Ordering::SeqCst);
            }
            outstanding.fetch_sub(1, Ordering::SeqCst);
        });
    }
    while tasks.join_next().await.is_some() {}
    // served over the step's own length, or longer if the last answers came late
    let seconds = start.elapsed().as_secs_f64().max(args.step_seconds);
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    Step {
        offered_per_second: rate,
        seconds,
        sent: total,
        completed: l.len() as u64,
        errors: errors.load(Ordering::SeqCst),
        p95_ms: calibration::quantile(&mut l, 0.95),
    }
}
