//! `bench-cache` (run by `scripts/bench-cache`): does cache-aware balancing raise a real cache's hit ratio?
//!
//! Four instances of the demo app (each with a bounded LRU cache of search results: a hit costs no CPU, a miss burns
//! `--cost-ms`) behind the bundled proxy with the filter. For each algorithm, fresh instances (cold caches), then
//! `--clients` clients send a Zipf-distributed query workload (`--keys` queries, exponent `--zipf`) flat out: a warm-up,
//! then a measured window. Per algorithm: the cache hit ratio (from each answer's `x-cache`), p50 and p99 latency,
//! requests per second, each instance's share and the spread (the largest share's distance from an equal share, in
//! percent of it). Writes `report.json` in `--out`.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use equilibrio_tests::proxy::{Kind, Proxy};
use equilibrio_tests::table_server::{TableServer, endpoint};
use serde_json::{Value, json};

const SERVICE: &str = "agente-vendedor";

#[derive(Parser)]
struct Args {
    /// Where report.json goes.
    #[arg(long, default_value = "target/bench-cache")]
    out: std::path::PathBuf,
    /// Instances of the demo app.
    #[arg(long, default_value_t = 4)]
    instances: usize,
    /// Entries of each instance's cache.
    #[arg(long, default_value_t = 2500)]
    cache_entries: usize,
    /// Distinct queries.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// The Zipf exponent of the query popularity (1.0: the classic web workload).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// CPU milliseconds a cache miss costs.
    #[arg(long, default_value_t = 2)]
    cost_ms: u64,
    /// Concurrent clients, flat out.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of warm-up, then of measurement, per algorithm.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

/// The algorithms compared, with their policy.
fn algorithms() -> Vec<(&'static str, Value)> {
    vec![
        ("weighted_round_robin", json!({"algorithm": "weighted_round_robin"})),
        ("least_connections", json!({"algorithm": "least_connections"})),
        ("response_time", json!({"algorithm": "response_time"})),
        ("random", json!({"algorithm": "random"})),
        (
            "consistent_hash",
            json!({"algorithm": "consistent_hash", "consistent_hash": {"key": "query:q", "load_factor": 1.25}}),
        ),
    ]
}

/// Zipf sampling over ranks 1..=n by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for rank in 1..=n {
            sum += 1.0 / (rank as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let u = rng.f64();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len().saturating_sub(1))
    }
}

struct Instance {
    id: String,
    addr: std::net::SocketAddr,
    child: Child,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_instances(args: &Args) -> anyhow::Result<Vec<Instance>> {
    let bin = equilibrio_tests::repo_root().join("target/release/equilibrio-demo-app");
    let mut out = Vec::new();
    for i in 1..=args.instances {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let id = format!("av-{i}");
        let child = Command::new(&bin)
            .env("PORT", port.to_string())
            .env("INSTANCE_ID", &id)
            .env("CACHE_ENTRIES", args.cache_entries.to_string())
            .env("CPU_COST_MS", args.cost_ms.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("{}: {e} (scripts/bench-cache builds it)", bin.display()))?;
        out.push(Instance { id, addr: ([127, 0, 0, 1], port).into(), child });
    }
    // up when each listens
    for inst in &out {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(inst.addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "{} never listened", inst.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Window {
    latencies_ms: Vec<f64>,
    hits: usize,
    misses: usize,
    errors: usize,
    by_instance: BTreeMap<String, usize>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64) * q) as usize).or(sorted.last()).copied().unwrap_or(0.0)
}

/// `clients` loops of Zipf queries until `stop`; what they saw while `measuring`.
async fn run_clients(
    url: String,
    clients: usize,
    zipf: Arc<Zipf>,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    window: Arc<Mutex<Window>>,
) {
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build().unwrap_or_default();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (http, url, zipf, stop, measuring, window) =
            (http.clone(), url.clone(), zipf.clone(), stop.clone(), measuring.clone(), window.clone());
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(0x5eed ^ c as u64);
            while !stop.load(Ordering::Relaxed) {
                let q = zipf.sample(&mut rng);
                let started = Instant::now();
                let answer = http.get(format!("{url}/search?q=query-{q}")).send().await;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let seen = match answer {
                    Ok(r) if r.status().is_success() => {
                        let hit = r.headers().get("x-cache").is_some_and(|v| v.as_bytes() == b"hit");
                        let body = r.text().await.unwrap_or_default();
                        let instance = serde_json::from_str::<Value>(&body)
                            .ok()
                            .and_then(|v| v["instance"].as_str().map(str::to_string))
                            .unwrap_or_default();
                        Some((hit, instance))
                    }
                    _ => None,
                };
                if measuring.load(Ordering::Relaxed) {
                    let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                    match seen {
                        Some((hit, instance)) => {
                            w.latencies_ms.push(ms);
                            if hit {
                                w.hits += 1;
                            } else {
                                w.misses += 1;
                            }
                            *w.by_instance.entry(instance).or_default() += 1;
                        }
                        None => w.errors += 1,
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let zipf = Arc::new(Zipf::new(args.keys, args.zipf));
    let table = TableServer::start(SERVICE, Vec::new(), Value::Null).await?;
    let filter = json!({
        "service": SERVICE,
        "supervisor": {"cluster": "supervisor", "authority": table.addr().to_string(), "poll_period": "500ms"},
        "passive_health": {"enabled": false},
    });
    let proxy = Proxy::start(Kind::Host, &filter, table.addr()).await?;
    let mut results = Vec::new();
    for (name, policy) in algorithms() {
        let instances = start_instances(&args)?;
        let eps = instances.iter().map(|i| endpoint(&i.id, i.addr, 100, "healthy")).collect();
        table.update(Some(eps), Some(policy));
        let version = table.version();
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy.stat("wasmcustom.equilibrio_table_version").await != Some(version) {
            anyhow::ensure!(Instant::now() < deadline, "the proxy never took table {version}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await; // every worker's tick
        let (stop, measuring) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let window: Arc<Mutex<Window>> = Arc::default();
        let load = tokio::spawn(run_clients(
            proxy.url(""),
            args.clients,
            zipf.clone(),
            stop.clone(),
            measuring.clone(),
            window.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        measuring.store(true, Ordering::SeqCst);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        measuring.store(false, Ordering::SeqCst);
        let elapsed = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::SeqCst);
        let _ = load.await;
        let mut w = std::mem::take(&mut *window.lock().unwrap_or_else(|p| p.into_inner()));
        w.latencies_ms.sort_by(f64::total_cmp);
        let served = w.hits + w.misses;
        let equal = 1.0 / args.instances as f64;
        let shares: BTreeMap<String, f64> = instances
            .iter()
            .map(|i| {
                let n = w.by_instance.get(&i.id).copied().unwrap_or(0);
                (i.id.clone(), n as f64 / served.max(1) as f64)
            })
            .collect();
        let spread = shares.values().map(|s| (s - equal).abs()).fold(0.0, f64::max) / equal * 100.0;
        let row = json!({
            "algorithm": name,
            "requests": served,
            "errors": w.errors,
            "requests_per_second": served as f64 / elapsed,
            "hit_ratio": w.hits as f64 / served.max(1) as f64,
            "p50_ms": quantile(&w.latencies_ms, 0.5),
            "p99_ms": quantile(&w.latencies_ms, 0.99),
            "shares": shares,
            "spread_percent": spread,
        });
        println!(
            "{name:<22} hit ratio {:>5.1}%  {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  spread {:>5.1}%  errors {}",
            100.0 * w.hits as f64 / served.max(1) as f64,
            served as f64 / elapsed,
            quantile(&w.latencies_ms, 0.5),
            quantile(&w.latencies_ms, 0.99),
            spread,
            w.errors
        );
        results.push(row);
        drop(instances);
    }
    let report = json!({
        "parameters": {
            "instances": args.instances, "cache_entries": args.cache_entries, "keys": args.keys, "zipf": args.zipf,
            "cost_ms": args.cost_ms, "clients": args.clients, "warmup_s": args.warmup, "seconds": args.seconds,
            "proxy": "equilibrio-host (2 workers) + filter",
        },
        "algorithms": results,
    });
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
