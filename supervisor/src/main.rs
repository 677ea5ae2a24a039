//! `equilibrio-supervisor --config <file>`: loads the configuration and the state file, starts the health monitor and
//! the API, and shuts down gracefully on SIGTERM or Ctrl-C (readiness fails first, then in-flight calls finish).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use equilibrio_supervisor::config::{Config, StoreConfig};
use equilibrio_supervisor::etcd::election::{Election, LeaderInfo, leader_key};
use equilibrio_supervisor::etcd::store::EtcdStore;
use equilibrio_supervisor::leadership::Leadership;
use equilibrio_supervisor::{api, app::App, monitor, scaling, serve};

#[derive(Parser)]
#[command(
    name = "equilibrio-supervisor",
    version,
    about = "Registers, health-checks and serves instances to Equilibrio's proxies"
)]
struct Args {
    /// The YAML configuration file.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Listen here instead of the configuration's `listen`.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EQUILIBRIO_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("equilibrio-supervisor: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let text =
        std::fs::read_to_string(&args.config).map_err(|e| format!("cannot read {}: {e}", args.config.display()))?;
    let mut config = Config::parse(&text, std::env::var("EQUILIBRIO_TOKEN").ok())
        .map_err(|e| format!("invalid configuration: {e}"))?;
    if let Some(listen) = args.listen {
        if config.token.is_none() && !listen.ip().is_loopback() {
            return Err(format!("invalid configuration: `listen`: {listen} is not loopback: set a token").into());
        }
        config.listen = listen;
    }
    config.fault_injection = std::env::var("EQUILIBRIO_FAULT_INJECTION").is_ok_and(|v| v == "1");
    if config.fault_injection {
        tracing::warn!("EQUILIBRIO_FAULT_INJECTION=1: test-only fault injection is on");
    }
    let listen = config.listen;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = match config.store.clone() {
        StoreConfig::Etcd(etcd) => {
            let leadership = Arc::new(Leadership::elected());
            let store = Arc::new(EtcdStore::connect(&etcd, &config.node_id, leadership.clone()).await?);
            let mut attempt = 0;
            // two nodes seeding a new deployment at once: the one that loses reads what the other wrote
            let (app, revision) = loop {
                attempt += 1;
                let (saved, revision) = store.load().await?;
                match App::shared(config.clone(), store.clone(), saved, leadership.clone()).await {
                    Ok(app) => break (app, revision),
                    Err(equilibrio_supervisor::persist::PersistError::Conflict) if attempt < 5 => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            let app = Arc::new(app);
            tokio::spawn(store.clone().follow(revision));
            let shown = app.clone();
            tokio::spawn(store.clone().follow_events(move |e| shown.events.publish_remote(e)));
            let election = Election {
                client: store.client(),
                key: leader_key(store.prefix()),
                me: LeaderInfo { node_id: config.node_id.clone(), url: format!("http://{listen}") },
                ttl: Duration::from_millis(etcd.lease_ttl_ms),
                leadership,
            };
            tokio::spawn(election.run(stop_rx.clone()));
            tracing::info!(node = %config.node_id, endpoints = ?etcd.endpoints, prefix = %etcd.prefix,
                "registry in etcd, shared with the other supervisors of the prefix");
            app
        }
        StoreConfig::Memory | StoreConfig::File(_) => Arc::new(App::new(config)?),
    };
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, services = app.registry().services.len(), "supervisor started");

    let monitor = tokio::spawn(monitor::run(app.clone(), stop_rx.clone()));
    let templates: std::collections::HashMap<_, _> =
        app.config.services.iter().filter_map(|(n, s)| s.docker.clone().map(|t| (n.clone(), t))).collect();
    let secret = app.registry().secret.clone().ok_or("no deployment secret")?;
    let scaler = (!templates.is_empty()).then(|| {
        tracing::info!(services = templates.len(), "auto-scaling through the Docker API");
        let runtime = Arc::new(scaling::docker::DockerRuntime::new(templates, secret));
        tokio::spawn(scaling::controller::run(app.clone(), runtime, stop_rx.clone()))
    });
    let shutdown_app = app.clone();
    let limits = serve::Limits {
        header_read_timeout: Duration::from_millis(app.config.header_read_timeout_ms),
        max_connections: app.config.max_connections,
    };
    let mut server = tokio::spawn(serve::run(listener, api::router(app.clone()), limits, stop_rx.clone()));
    let mut monitor = monitor;
    let mut scaler = scaler;
    let scaler_ended = async {
        match scaler.as_mut() {
            Some(s) => s.await,
            None => std::future::pending().await,
        }
    };

    // a request's panic costs that request (api::contain_panics); a background task that ends before shutdown
    // (a panic) would leave the supervisor half working: it exits instead, for its service manager to restart it
    tokio::select! {
        _ = shutdown_signal() => {}
        r = &mut monitor => return Err(format!("the health monitor stopped: {r:?}").into()),
        r = &mut server => return Err(format!("the API server stopped: {r:?}").into()),
        r = scaler_ended => return Err(format!("the autoscaler stopped: {r:?}").into()),
    }
    tracing::info!("shutting down: not ready, finishing calls in flight");
    shutdown_app.ready.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let _ = monitor.await;
    if let Some(s) = scaler {
        let _ = s.await;
    }
    // the server drains the calls in flight itself (bounded: SSE streams never end on their own)
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
