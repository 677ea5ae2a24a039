//! `sim-proxies`: simulated proxies posting real reports to a supervisor, for `scripts/bench-scale` (the
//! supervisor's cost with many proxies reporting about many instances).
//!
//! Usage: `sim-proxies --supervisor http://127.0.0.1:9900 --service av --proxies 50 --period-ms 1000 id...`
//! (the token from `EQUILIBRIO_TOKEN`). Every period each proxy posts one `POST /v1/reports` with every endpoint's
//! window (requests, errors, latency sum and p95, in flight), as the filter's poller does. Prints a line with the
//! reports sent and refused when it ends (SIGINT or SIGTERM).

use std::time::Duration;

use equilibrio_contract::report::{EndpointReport, Report};

struct Args {
    supervisor: String,
    service: String,
    proxies: usize,
    period: Duration,
    endpoints: Vec<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        supervisor: "http://127.0.0.1:9900".into(),
        service: "agente-vendedor".into(),
        proxies: 50,
        period: Duration::from_secs(1),
        endpoints: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| anyhow::anyhow!("`{name}` needs a value"));
        match arg.as_str() {
            "--supervisor" => a.supervisor = value("--supervisor")?,
            "--service" => a.service = value("--service")?,
            "--proxies" => a.proxies = value("--proxies")?.parse()?,
            "--period-ms" => a.period = Duration::from_millis(value("--period-ms")?.parse()?),
            id => a.endpoints.push(id.to_string()),
        }
    }
    anyhow::ensure!(!a.endpoints.is_empty(), "no endpoint ids given");
    // in the table's order (sorted by id), as the filter lists them
    a.endpoints.sort();
    Ok(a)
}

/// One proxy's report for one window: every endpoint got some traffic, figures varying by proxy and window.
fn report(a: &Args, proxy: usize, window: u64) -> Report {
    let endpoints = a
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let requests = 5 + ((proxy as u64 * 7 + i as u64 * 13 + window * 3) % 20);
            EndpointReport {
                id: id.clone(),
                requests,
                errors: u64::from((i + proxy).is_multiple_of(97)),
                latency_sum_ms: requests as f64 * 4.5,
                latency_p95_ms: 9.0 + (i % 5) as f64,
                in_flight: (i % 3) as i64,
                ejected: false,
            }
        })
        .collect();
    Report {
        service: a.service.clone(),
        proxy: format!("sim-{proxy}"),
        table_version: 1,
        window_ms: a.period.as_millis() as u64,
        rate_limited: 0,
        endpoints,
        zone: None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let token = std::env::var("EQUILIBRIO_TOKEN").unwrap_or_default();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let url = format!("{}/v1/reports", a.supervisor.trim_end_matches('/'));
    let (mut sent, mut refused) = (0u64, 0u64);
    let mut tick = tokio::time::interval(a.period);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut window = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        window += 1;
        // the proxies report at once, as real ones polling on the same period can
        let mut posts = tokio::task::JoinSet::new();
        for p in 0..a.proxies {
            let post = client.post(&url).bearer_auth(&token).json(&report(&a, p, window)).send();
            posts.spawn(async move { post.await.is_ok_and(|r| r.status().is_success()) });
        }
        while let Some(ok) = posts.join_next().await {
            if ok.unwrap_or(false) {
                sent += 1;
            } else {
                refused += 1;
            }
        }
    }
    println!("sim-proxies: reports_sent={sent} reports_refused={refused}");
    Ok(())
}
