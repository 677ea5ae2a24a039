//! `equilibrio-load-test` (run by `scripts/load-test`): our users' load tests (docs/configuration.md) against the demo service through the proxy
//! and the filter, with the autoscaler on. Three phases: high-load distribution (a few clients flat out), many
//! concurrent users (many clients with think time), and a stress run past capacity (many clients flat out, more than
//! `max_instances` can serve). Every second it records requests/s, p50/p95/p99, errors, and instances; writes
//! `report.json` in `--out` (charts are drawn from it by `scripts/load-test`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use equilibrio_demo::{cleanup_containers, instances};

#[derive(Parser)]
struct Args {
    /// Where report.json goes.
    #[arg(long, default_value = "target/load-test")]
    out: std::path::PathBuf,
    /// Seconds per phase.
    #[arg(long, default_value_t = 40)]
    phase_seconds: u64,
    /// The proxy: `host` (the bundled proxy) or `envoy`.
    #[arg(long, default_value = "host", value_parser = equilibrio_demo::parse_proxy)]
    proxy: equilibrio_tests::proxy::Kind,
}

/// (name, clients, think time ms)
const PHASES: [(&str, usize, u64); 3] =
    [("high_load_distribution", 8, 0), ("concurrent_users", 64, 250), ("stress", 96, 0)];

#[derive(Default)]
struct Second {
    latencies_ms: Vec<f64>,
    errors: usize,
    by_instance: std::collections::BTreeMap<String, usize>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64) * q) as usize).or(sorted.last()).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let (s, proxy) = equilibrio_demo::start(
        args.proxy,
        "{max_instances: 3, slow_start: 3, scale_down_stabilization: 20, cpu_utilization: {measurement_window: 20}, memory_utilization: {measurement_window: 20}, request_rate: {measurement_window: 20}, response_time: {measurement_window: 20}}",
        10,
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicUsize::new(0));
    let think = Arc::new(AtomicUsize::new(0));
    let current: Arc<Mutex<Second>> = Arc::default();
    let max_clients = PHASES.iter().map(|p| p.1).max().unwrap_or(1);
    let mut tasks = Vec::new();
    for n in 0..max_clients {
        let (stop, active, think, current, url) =
            (stop.clone(), active.clone(), think.clone(), current.clone(), proxy.url("/search?q=zapatos"));
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
            while !stop.load(Ordering::SeqCst) {
                if n >= active.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let pause = think.load(Ordering::SeqCst);
                if pause > 0 {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..2 * pause as u64))).await;
                }
                let t = Instant::now();
                let r = client.get(&url).send().await;
                let ok = match r {
                    Ok(r) if r.status() == 200 => r.text().await.ok(),
                    _ => None,
                };
                let id = ok
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["instance"].as_str().map(str::to_string));
                if let Ok(mut c) = current.lock() {
                    match id {
                        Some(id) => {
                            c.latencies_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                            *c.by_instance.entry(id).or_default() += 1;
                        }
                        None => c.errors += 1,
                    }
                }
            }
        }));
    }
    let mut seconds = Vec::new();
    let began = Instant::now();
    for (name, clients, pause) in PHASES {
        eprintln!("load-test: {name}: {clients} clients, think time {pause} ms, {} s", args.phase_seconds);
        active.store(clients, Ordering::SeqCst);
        think.store(pause as usize, Ordering::SeqCst);
        for _ in 0..args.phase_seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let sec = current.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default();
            let mut lat = sec.latencies_ms.clone();
            lat.sort_by(|a, b| a.total_cmp(b));
            let healthy = instances(&s).await.iter().filter(|(_, st)| st == "healthy").count();
            seconds.push(serde_json::json!({
                "t": began.elapsed().as_secs_f64(), "phase": name, "clients": clients,
                "requests_per_second": lat.len(), "errors": sec.errors,
                "p50_ms": quantile(&lat, 0.50), "p95_ms": quantile(&lat, 0.95), "p99_ms": quantile(&lat, 0.99),
                "instances": healthy, "by_instance": sec.by_instance,
            }));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    let events = s.get(&format!("/v1/services/{}/scaling/events", equilibrio_demo::SERVICE)).await.unwrap_or_default();
    let mut phases = Vec::new();
    for (name, clients, pause) in PHASES {
        let rows: Vec<&serde_json::Value> = seconds.iter().filter(|r| r["phase"] == name).collect();
        let total: u64 = rows.iter().map(|r| r["requests_per_second"].as_u64().unwrap_or(0)).sum();
        let errors: u64 = rows.iter().map(|r| r["errors"].as_u64().unwrap_or(0)).sum();
        let mut p95: Vec<f64> = rows.iter().filter_map(|r| r["p95_ms"].as_f64()).collect();
        p95.sort_by(|a, b| a.total_cmp(b));
        phases.push(serde_json::json!({
            "phase": name, "clients": clients, "think_time_ms": pause, "requests": total, "errors": errors,
            "error_rate": if total + errors > 0 { errors as f64 / (total + errors) as f64 } else { 0.0 },
            "requests_per_second": total as f64 / rows.len().max(1) as f64,
            "p95_ms_median_second": quantile(&p95, 0.5),
            "max_instances": rows.iter().filter_map(|r| r["instances"].as_u64()).max(),
        }));
    }
    let report = serde_json::json!({"phases": phases, "seconds": seconds, "scaling_events": events});
    std::fs::write(args.out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report["phases"])?);
    drop(proxy);
    drop(s);
    cleanup_containers();
    Ok(())
}
