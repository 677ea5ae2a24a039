//! `equilibrio-demo` (run by `scripts/demo`): starts the supervisor with the demo service (auto-scaled Docker
//! containers of `equilibrio/agente-vendedor:dev`), a proxy running the filter, and a load ramp (low, high, low), and
//! narrates: instances and their state, each one's share of the traffic, p95 latency, and every scaling event, up and
//! back down. Stops everything it started at the end or on Ctrl-C. With `--ha`: three supervisors on etcd, and the
//! leader is killed at the height of the load; the narration shows who leads, and that no request failed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use equilibrio_demo::{SERVICE, cleanup_containers, instances};
use equilibrio_tests::supervisor::{Supervisor, TOKEN, leading};

const QUIET_PACE_MS: usize = 4000;

#[derive(Parser)]
#[command(about = "Equilibrio's demo: balance and scale agente-vendedor's stand-in under a load ramp")]
struct Args {
    /// The proxy: `host` (the bundled proxy) or `proxy`.
    #[arg(long, default_value = "host", value_parser = equilibrio_demo::parse_proxy)]
    proxy: equilibrio_tests::proxy::Kind,
    /// Seconds of demo (the load ramp is scaled to it).
    #[arg(long, default_value_t = 150)]
    duration: u64,
    /// Clients at the peak of the ramp.
    #[arg(long, default_value_t = 8)]
    peak_clients: usize,
    /// Three supervisors on etcd instead of one (the bundled proxy only); the leader is killed mid-demo.
    #[arg(long)]
    ha: bool,
}

/// The node to ask for the narration: one still running.
fn alive(nodes: &[Supervisor]) -> Option<&Supervisor> {
    nodes.iter().find(|n| n.pid().is_some())
}

#[derive(Default)]
struct Window {
    by_instance: BTreeMap<String, usize>,
    latencies_ms: Vec<f64>,
    failed: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.ha || args.proxy == equilibrio_tests::proxy::Kind::Host,
        "--ha runs the bundled proxy (give Envoy one cluster per node: docs/high-availability.md)"
    );
    let scaling = "{slow_start: 5, scale_down_stabilization: 20, scale_down_cooldown: 10, cpu_utilization: {measurement_window: 20}, memory_utilization: {measurement_window: 20}, request_rate: {measurement_window: 20}, response_time: {measurement_window: 20}}";
    let (etcd, mut nodes, proxy) = if args.ha {
        let (etcd, nodes, proxy) = equilibrio_demo::start_ha(scaling, 15).await?;
        (Some(etcd), nodes, proxy)
    } else {
        let (s, proxy) = equilibrio_demo::start(args.proxy, scaling, 15).await?;
        (None, vec![s], proxy)
    };
    for n in &nodes {
        println!("\n  Dashboard: http://{}/   (token: {TOKEN})", n.addr);
    }
    println!("  Supervisor API: http://{}/openapi.json\n", nodes[0].addr);
    println!("  Proxy ({}): {}\n", equilibrio_demo::proxy_name(args.proxy), proxy.url("/search?q=zapatos"));
    if args.ha {
        let leads = leading(&nodes).await.map_or("none yet".to_string(), |i| format!("node-{}", i + 1));
        println!("  Three supervisors on etcd; {leads} leads (health checks, autoscaler). It is killed mid-demo.\n");
    }
    // the leader's kill, and whether the new leader was announced
    let (mut killed_at, mut announced): (Option<Instant>, bool) = (None, false);

    let stop = Arc::new(AtomicBool::new(false));
    let wanted = Arc::new(AtomicUsize::new(1));
    // between requests of a client: the quiet phases are a trickle (under the plan's 20 requests per minute per
    // instance, so the service can scale back down), the peak is as fast as the clients go
    let pace_ms = Arc::new(AtomicUsize::new(QUIET_PACE_MS));
    let window: Arc<Mutex<Window>> = Arc::default();
    let mut clients = Vec::new();
    for n in 0..args.peak_clients {
        let (stop, wanted, window, url, pace_ms) =
            (stop.clone(), wanted.clone(), window.clone(), proxy.url("/search?q=zapatos"), pace_ms.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                if n >= wanted.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                let pace = pace_ms.load(Ordering::SeqCst);
                if pace > 0 {
                    tokio::time::sleep(Duration::from_millis(pace as u64)).await;
                }
                let t = Instant::now();
                let r = client.get(&url).send().await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let body = match r {
                    Ok(r) if r.status() == 200 => r.text().await.ok(),
                    _ => None,
                };
                let id = body
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["instance"].as_str().map(str::to_string));
                if let Ok(mut w) = window.lock() {
                    match id {
                        Some(id) => {
                            *w.by_instance.entry(id).or_default() += 1;
                            w.latencies_ms.push(ms);
                        }
                        None => w.failed += 1,
                    }
                }
            }
        }));
    }

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let began = Instant::now();
    let mut seen_events = 0usize;
    let (mut total, mut failed_total) = (0usize, 0usize);
    println!("  {:>5}  {:>7}  {:>6}  {:>7}  instances (state: share of traffic)", "time", "clients", "req/s", "p95 ms");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = &mut ctrl_c => { println!("\n  Ctrl-C: stopping"); break; }
        }
        let t = began.elapsed().as_secs();
        if t >= args.duration {
            break;
        }
        if args.ha && killed_at.is_none() && t >= args.duration * 2 / 5 {
            if let Some(i) = leading(&nodes).await {
                println!("  >> kill -9 of node-{}, the leader, under load", i + 1);
                nodes[i].kill9();
                killed_at = Some(Instant::now());
            }
        } else if let Some(at) = killed_at.filter(|_| !announced)
            && let Some(i) = leading(&nodes).await
        {
            let after = at.elapsed().as_secs_f64();
            println!("  >> node-{} leads, {after:.1} s after the kill; {failed_total} requests failed so far", i + 1);
            announced = true;
        }
        let Some(s) = alive(&nodes) else { break };
        // the ramp: low for the first fifth, peak until three fifths, then low again
        let phase = t * 5 / args.duration.max(5);
        let peak = (1..3).contains(&phase);
        wanted.store(if peak { args.peak_clients } else { 1 }, Ordering::SeqCst);
        pace_ms.store(if peak { 0 } else { QUIET_PACE_MS }, Ordering::SeqCst);
        let w = window.lock().map(|mut w| std::mem::take(&mut *w)).unwrap_or_default();
        let n: usize = w.by_instance.values().sum();
        total += n;
        failed_total += w.failed;
        let mut lat = w.latencies_ms.clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        let p95 = lat.get(((lat.len() as f64) * 0.95) as usize).copied().unwrap_or(0.0);
        let states = instances(s).await;
        let line: Vec<String> = states
            .iter()
            .map(|(id, st)| {
                let share = w.by_instance.get(id).map_or(0.0, |c| *c as f64 * 100.0 / n.max(1) as f64);
                format!("{id} ({st}: {share:.0}%)")
            })
            .collect();
        println!(
            "  {:>4}s  {:>7}  {:>6.1}  {:>7.1}  {}",
            t,
            wanted.load(Ordering::SeqCst),
            n as f64 / 2.0,
            p95,
            line.join("  ")
        );
        if let Ok(events) = s.get(&format!("/v1/services/{SERVICE}/scaling/events")).await
            && let Some(list) = events.as_array()
        {
            for e in list.iter().skip(seen_events) {
                println!(
                    "  >> scaling {}: {} -> {} ({})",
                    e["kind"].as_str().unwrap_or(""),
                    e["from"],
                    e["to"],
                    e["reason"].as_str().unwrap_or("")
                );
            }
            seen_events = list.len();
        }
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    println!("\n  {total} requests, {failed_total} failed. Stopping the proxy, the supervisor and the containers.");
    drop(proxy);
    nodes.clear();
    drop(etcd);
    cleanup_containers();
    Ok(())
}
