//! `bench-failover`: the leader of three supervisors on a three-member etcd is killed (`kill -9`) while the bundled
//! proxy serves 500 requests a second and a client registers an instance through the nodes every 100 ms. Prints one
//! `name=value` line each: `leader_failover_seconds` (the kill until another node leads), `failed_requests` and
//! `total_requests` (through the proxy, over the whole run), `acknowledged_writes` and `lost_writes` (registrations
//! answered 201 that no surviving node has at the end). -1 seconds: no new leader during the run. Run by
//! `scripts/bench-failover`.
//!
//! The proxy polls a node that is not the leader: until the filter follows several addresses
//! (docs/high-availability.md), a proxy polling the killed node would keep its last table, which is what this run
//! would then measure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use equilibrio_tests::backend::Backend;
use equilibrio_tests::etcd::Etcd;
use equilibrio_tests::proxy::{Kind, Proxy};
use equilibrio_tests::supervisor::{Supervisor, TOKEN, leading, wait_leading};
use serde_json::json;

const SERVICE: &str = "agente-vendedor";
const RATE: u64 = 500;
const RUN: Duration = Duration::from_secs(12);
const KILL_AT: Duration = Duration::from_secs(4);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let lease = std::env::var("BENCH_LEASE_TTL").unwrap_or_else(|_| "2s".into());
    let etcd = Etcd::start(3).await?;
    let store = etcd.store_yaml("/bench-failover", &lease);
    let yaml = format!(
        "environment: production\nservices:\n  {SERVICE}:\n    health_check: {{interval: 500ms, timeout: 250ms, retries: 2, rise: 1}}\n"
    );
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Supervisor::start_node(&format!("node-{i}"), &store, &yaml).await?);
    }
    let mut backends = Vec::new();
    for i in 1..=3 {
        let b = Backend::start(&format!("av-{i}")).await?;
        let body = json!({"id": b.id, "address": b.addr.to_string()});
        let (code, answer) = nodes[0].call("POST", &format!("/v1/services/{SERVICE}/instances"), Some(body)).await?;
        anyhow::ensure!(code == 201, "registration refused: {code} {answer}");
        backends.push(b);
    }
    for b in &backends {
        for n in &nodes {
            n.wait_state(SERVICE, &b.id, "healthy", Duration::from_secs(10)).await?;
        }
    }
    let leader = wait_leading(&nodes, Duration::from_secs(10)).await.ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let polled = (leader + 1) % 3;
    let filter = json!({"service": SERVICE, "supervisor": {"cluster": "supervisor",
        "authority": nodes[polled].addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Proxy::start(Kind::Host, &filter, nodes[polled].addr).await?;
    let version = nodes[polled].get(&format!("/v1/services/{SERVICE}/endpoints")).await?["version"].as_u64();
    proxy.wait_for_table(3, version.unwrap_or(0)).await?;

    let (total, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::new();
    let url = proxy.url("/");
    let load = {
        let (total, failed, stop, client) = (total.clone(), failed.clone(), stop.clone(), client.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            let mut inflight = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let (total, failed, client, url) = (total.clone(), failed.clone(), client.clone(), url.clone());
                inflight.push(tokio::spawn(async move {
                    let ok = client.get(&url).send().await.is_ok_and(|r| r.status().is_success());
                    total.fetch_add(1, Ordering::SeqCst);
                    if !ok {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }));
            }
            for t in inflight {
                let _ = t.await;
            }
        })
    };

    let started = Instant::now();
    let mut acknowledged = Vec::new();
    let mut killed_at = None;
    let mut failover = None;
    let mut n = 0u32;
    while started.elapsed() < RUN {
        if killed_at.is_none() && started.elapsed() >= KILL_AT {
            nodes[leader].kill9();
            killed_at = Some(Instant::now());
        }
        // the killed node is not asked
        if let (Some(at), None) = (killed_at, failover)
            && leading(&nodes).await.is_some()
        {
            failover = Some(at.elapsed());
        }
        // a registration through the next live node (the instance listens nowhere: it stays out of the traffic)
        n += 1;
        let through = (0..3).map(|k| (n as usize + k) % 3).find(|&i| killed_at.is_none() || i != leader).unwrap_or(0);
        let id = format!("w-{n}");
        let body = json!({"id": id, "address": format!("127.0.0.1:{}", 20_000 + n)});
        if let Ok((201, _)) =
            nodes[through].call("POST", &format!("/v1/services/{SERVICE}/instances"), Some(body)).await
        {
            acknowledged.push(id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let _ = load.await;

    let mut lost = 0;
    let survivor = &nodes[polled];
    let listed = survivor.get(&format!("/v1/services/{SERVICE}/instances")).await?;
    let ids: std::collections::HashSet<&str> =
        listed.as_array().map(|a| a.iter().filter_map(|i| i["id"].as_str()).collect()).unwrap_or_default();
    for id in &acknowledged {
        lost += usize::from(!ids.contains(id.as_str()));
    }
    println!("leader_failover_seconds={:.2}", failover.map_or(-1.0, |d| d.as_secs_f64()));
    println!("failed_requests={}", failed.load(Ordering::SeqCst));
    println!("total_requests={}", total.load(Ordering::SeqCst));
    println!("acknowledged_writes={}", acknowledged.len());
    println!("lost_writes={lost}");
    println!("lease_ttl={lease}");
    drop(etcd);
    Ok(())
}
