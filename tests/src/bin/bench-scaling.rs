//! `bench-scaling`: a real load step through Envoy + the filter against the demo containers, scaled by the real
//! supervisor. Prints one `name=value` line each: `scale_up_seconds` (load step until a new instance serves traffic),
//! `scale_down_seconds` (load ends until the service is back at its minimum: stabilization, drain, stop),
//! `failed_requests` and `total_requests` (during both), and the cost check: `instance_seconds_measured` (what the
//! supervisor's cost figures say) beside `instance_seconds_wall` (this program's own count: the running containers,
//! sampled twice a second from the supervisor's start to the moment it reads the figure). Run by
//! `scripts/bench-scaling`.
//!
//! The scaling policy is the development profile's (docs/configuration.md); `BENCH_FAST=1` shortens the measurement
//! windows and the scale-down stabilization to a few seconds. `BENCH_SWARM=1` runs the service as a Docker Swarm
//! service (`mode: swarm`, docs/swarm.md) on the daemon `DOCKER_HOST` names (a swarm manager: `scripts/swarm-lab env`
//! for the multi-node lab); instances are then its running tasks.

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use equilibrio_tests::envoy::Envoy;
use equilibrio_tests::supervisor::{Supervisor, TOKEN};

const IMAGE: &str = "equilibrio/agente-vendedor:dev";

fn swarm() -> bool {
    std::env::var("BENCH_SWARM").is_ok_and(|v| v == "1")
}

fn running(service: &str) -> usize {
    if swarm() {
        let out = Command::new("docker")
            .args(["service", "ps", "--filter", "desired-state=running", "--format", "{{.CurrentState}}", service])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("Running")).count());
        return out.unwrap_or(0);
    }
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=io.equilibrio.service={service}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().count());
    out.unwrap_or(0)
}

fn cleanup(service: &str) {
    if swarm() {
        let _ = Command::new("docker").args(["service", "rm", service]).output();
        return;
    }
    if let Ok(o) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=io.equilibrio.service={service}")])
        .output()
    {
        for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = format!("av-bench-{}", std::process::id());
    let fast = std::env::var("BENCH_FAST").is_ok_and(|v| v == "1");
    let load_seconds: u64 = std::env::var("BENCH_LOAD_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let scaling = if fast {
        "{slow_start: 2, scale_down_stabilization: 10, cpu_utilization: {measurement_window: 10}, memory_utilization: {measurement_window: 10}, request_rate: {measurement_window: 10}, response_time: {measurement_window: 10}}"
    } else {
        "{}"
    };
    let yaml = format!(
        "environment: development\ndrain_timeout: 10\nservices:\n  {service}:\n    health_check: {{interval: 250ms, timeout: 200ms, retries: 2, rise: 1}}\n    docker: {{mode: {mode}, image: '{IMAGE}', port: 8080, env: ['CPU_COST_MS=20'], cpus: 0.5, memory_mb: 64, stop_grace: 5}}\n    scaling: {scaling}\n",
        mode = if swarm() { "swarm" } else { "container" }
    );
    let s = Supervisor::start(&yaml).await?;
    let wall = Arc::new(Mutex::new(0.0f64));
    let sampler = tokio::spawn(count_instance_seconds(service.clone(), wall.clone()));
    let result = run(&s, &service, load_seconds).await;
    if result.is_ok() {
        // the supervisor's figure and ours, read at the same moment
        let view = s.get(&format!("/v1/services/{service}/scaling")).await?;
        let wall = *wall.lock().map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        sampler.abort();
        let measured = view["cost"]["instance_seconds"].as_f64().unwrap_or(0.0);
        println!("instance_seconds_measured={measured:.1}");
        println!("instance_seconds_wall={wall:.1}");
        println!("instance_seconds_difference_percent={:.1}", (measured - wall).abs() / wall.max(1e-9) * 100.0);
    }
    drop(s);
    cleanup(&service);
    result
}

/// Integrates the number of running containers over wall-clock time (sampled every 500 ms) into `total`.
async fn count_instance_seconds(service: String, total: Arc<Mutex<f64>>) {
    let mut last = Instant::now();
    let mut count = 0usize;
    loop {
        let now = tokio::task::spawn_blocking({
            let service = service.clone();
            move || running(&service)
        })
        .await
        .unwrap_or(0);
        let at = Instant::now();
        if let Ok(mut t) = total.lock() {
            // the interval is charged at the previous sample's count, as the supervisor does
            *t += count as f64 * at.duration_since(last).as_secs_f64();
        }
        (last, count) = (at, now);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(s: &Supervisor, service: &str, load_seconds: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let v = s.get(&format!("/v1/services/{service}/instances")).await?;
        if v.as_array().is_some_and(|a| a.iter().any(|i| i["state"] == "healthy")) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the first instance never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let filter = serde_json::json!({"service": service,
        "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let envoy = Envoy::start(&filter, s.addr).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let seen: Arc<Mutex<(HashSet<String>, Option<Duration>)>> = Arc::default();
    let step = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (stop, total, failed, seen, url) =
            (stop.clone(), total.clone(), failed.clone(), seen.clone(), envoy.url("/search?q=zapatos"));
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                total.fetch_add(1, Ordering::SeqCst);
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        let id = body["instance"].as_str().unwrap_or_default().to_string();
                        if let Ok(mut s) = seen.lock() {
                            if !s.0.is_empty() && !s.0.contains(&id) && s.1.is_none() {
                                s.1 = Some(step.elapsed());
                            }
                            s.0.insert(id);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(load_seconds)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    let ended = Instant::now();
    let peak = running(service);
    // back at the minimum (1 in the development profile)
    while running(service) > 1 {
        anyhow::ensure!(ended.elapsed() < Duration::from_secs(900), "did not scale down within 15 minutes");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let down = ended.elapsed();
    let up = seen.lock().ok().and_then(|s| s.1);
    println!("scale_up_seconds={}", up.map_or("none".into(), |d| format!("{:.1}", d.as_secs_f64())));
    println!("scale_down_seconds={:.1}", down.as_secs_f64());
    println!("failed_requests={}", failed.load(Ordering::SeqCst));
    println!("total_requests={}", total.load(Ordering::SeqCst));
    println!("peak_instances={peak}");
    drop(envoy);
    Ok(())
}
