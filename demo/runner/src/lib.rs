//! What `scripts/demo` and `scripts/load-test` share: bringing up the supervisor with the demo service (auto-scaled
//! containers of `equilibrio/agente-vendedor:dev`) and a proxy with the filter (the bundled proxy, or Envoy), and
//! cleaning up after.

use std::process::Command;
use std::time::{Duration, Instant};

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

/// Starts the supervisor (with `scaling` as the service's scaling overrides, YAML flow style) and waits for the
/// first healthy instance, then the proxy with the filter polling it.
pub async fn start(proxy: Kind, scaling: &str, cpu_cost_ms: u32) -> anyhow::Result<(Supervisor, Proxy)> {
    cleanup_containers();
    let yaml = format!(
        "environment: development\ndrain_timeout: 10\nservices:\n  {SERVICE}:\n    load_balancer: {{algorithm: least_connections}}\n    health_check: {{interval: 500ms, timeout: 300ms, retries: 2, rise: 1}}\n    docker: {{image: '{IMAGE}', port: 8080, env: ['CPU_COST_MS={cpu_cost_ms}'], cpus: 0.5, memory_mb: 64, stop_grace: 5}}\n    scaling: {scaling}\n"
    );
    let s = Supervisor::start(&yaml).await?;
    let start = Instant::now();
    while !instances(&s).await.iter().any(|(_, st)| st == "healthy") {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the first container never became healthy:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let filter = serde_json::json!({"service": SERVICE,
        "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Proxy::start(proxy, &filter, s.addr).await?;
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
    Ok((s, proxy))
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
