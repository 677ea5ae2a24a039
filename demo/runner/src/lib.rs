//! What `scripts/demo` and `scripts/load-test` share: bringing up the supervisor with the demo service (auto-scaled
//! containers of `equilibrio/agente-vendedor:dev`) and a proxy with the filter (the bundled proxy, or Envoy), and
//! cleaning up after. With `--ha`, three supervisors on an etcd of their own instead of one.

use std::process::Command;
use std::time::{Duration, Instant};

use equilibrio_tests::etcd::Etcd;
use equilibrio_tests::host::{Host, render_config_nodes};
use equilibrio_tests::proxy::{Kind, Proxy};
use equilibrio_tests::supervisor::{Supervisor, TOKEN};

pub const SERVICE: &str = "agente-vendedor";
pub const IMAGE: &str = "equilibrio/agente-vendedor:dev";

/// `--proxy host` (the bundled proxy, the default) or `--proxy envoy`.
pub fn parse_proxy(name: &str) -> Result<Kind, String> {
    match name {
        "host" | "equilibrio-host" => Ok(Kind::Host),
        "envoy" => Ok(Kind::Envoy),
        other => Err(format!("unknown proxy `{other}`: use `host` (the bundled proxy) or `envoy`")),
    }
}

/// How the narration names the proxy.
pub fn proxy_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Host => "equilibrio-host, the bundled proxy, + the filter",
        Kind::Envoy => "Envoy 1.40 + the filter",
    }
}

/// Removes every container of the demo service.
pub fn cleanup_containers() {
    if let Ok(o) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=io.equilibrio.service={SERVICE}")])
        .output()
    {
        for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

/// The demo service with `scaling` as its scaling overrides (YAML flow style).
fn service_yaml(scaling: &str, cpu_cost_ms: u32) -> String {
    format!(
        "environment: development\ndrain_timeout: 10\nservices:\n  {SERVICE}:\n    load_balancer: {{algorithm: least_connections}}\n    health_check: {{interval: 500ms, timeout: 300ms, retries: 2, rise: 1}}\n    docker: {{image: '{IMAGE}', port: 8080, env: ['CPU_COST_MS={cpu_cost_ms}'], cpus: 0.5, memory_mb: 64, stop_grace: 5}}\n    scaling: {scaling}\n"
    )
}

async fn first_healthy(s: &Supervisor) -> anyhow::Result<()> {
    let start = Instant::now();
    while !instances(s).await.iter().any(|(_, st)| st == "healthy") {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the first container never became healthy:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Starts the supervisor (with `scaling` as the service's scaling overrides, YAML flow style) and waits for the
/// first healthy instance, then the proxy with the filter polling it.
pub async fn start(proxy: Kind, scaling: &str, cpu_cost_ms: u32) -> anyhow::Result<(Supervisor, Proxy)> {
    cleanup_containers();
    let s = Supervisor::start(&service_yaml(scaling, cpu_cost_ms)).await?;
    first_healthy(&s).await?;
    let filter = serde_json::json!({"service": SERVICE,
        "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Proxy::start(proxy, &filter, s.addr).await?;
    wait_serving(&proxy).await?;
    Ok((s, proxy))
}

/// Three supervisors on an etcd of their own (lease 3 s), then the bundled proxy polling all three (the next one
/// when one does not answer).
pub async fn start_ha(scaling: &str, cpu_cost_ms: u32) -> anyhow::Result<(Etcd, Vec<Supervisor>, Proxy)> {
    cleanup_containers();
    let etcd = Etcd::start(1).await?;
    let store = etcd.store_yaml("/equilibrio-demo", "3s");
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(Supervisor::start_node(&format!("node-{i}"), &store, &service_yaml(scaling, cpu_cost_ms)).await?);
    }
    first_healthy(&nodes[0]).await?;
    let clusters: Vec<String> = (0..nodes.len()).map(|i| format!("supervisor-{i}")).collect();
    let filter = serde_json::json!({"service": SERVICE, "supervisor": {"clusters": clusters, "authority": "supervisor",
        "poll_period": "500ms", "timeout": "400ms", "token": TOKEN}});
    let addresses: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let proxy = Proxy::Host(Host::start_with(&render_config_nodes(&filter, &addresses)?, 2).await?);
    wait_serving(&proxy).await?;
    Ok((etcd, nodes, proxy))
}

async fn wait_serving(proxy: &Proxy) -> anyhow::Result<()> {
    // traffic starts once the filter has its first table (before it, the bundled proxy has no host to send to)
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(proxy.url("/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the proxy never served a request:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// (instance id, table state) of the demo service.
pub async fn instances(s: &Supervisor) -> Vec<(String, String)> {
    match s.get(&format!("/v1/services/{SERVICE}/instances")).await {
        Ok(v) => v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        (i["id"].as_str().unwrap_or("").to_string(), i["state"].as_str().unwrap_or("").to_string())
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => vec![],
    }
}
