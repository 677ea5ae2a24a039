//! `equilibrio-host -c proxy-config/host.yaml`: starts the bundled proxy and runs until SIGTERM or Ctrl-C, then
//! stops accepting and drains in-flight requests. A bad configuration, a bad `.wasm` or a filter that refuses its
//! configuration exits with status 1 and a message naming the problem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use anyhow::{Context, bail};
use clap::Parser;
use equilibrio_host::admin::{self, Admin};
use equilibrio_host::config::Config;
use equilibrio_host::context::Env;
use equilibrio_host::shared_data::SharedData;
use equilibrio_host::stats::Stats;
use equilibrio_host::vm::Plugin;
use equilibrio_host::worker::{self, Shared};

#[derive(Parser)]
#[command(version, about = "Equilibrio's bundled proxy: runs proxy-wasm filters on wasmtime")]
struct Args {
    /// The configuration file (see proxy-config/host.yaml).
    #[arg(short = 'c', long)]
    config: PathBuf,
    /// Worker threads, overriding `listener.workers` (as Envoy's --concurrency).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Write the admin address here once listening (as Envoy's --admin-address-path).
    #[arg(long)]
    admin_address_path: Option<PathBuf>,
    /// Log level, overriding `log_level` (trace, debug, info, warn, error).
    #[arg(short = 'l', long)]
    log_level: Option<String>,
    /// Write /tmp/perf-<pid>.map so that `perf report` names the filter's functions (docs/performance-tuning.md).
    #[arg(long)]
    wasm_perfmap: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = Config::load(&args.config);
    let level =
        args.log_level.clone().unwrap_or_else(|| config.as_ref().map_or("info", |c| c.log_level.as_str()).to_string());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},wasmtime=warn,cranelift=warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    let result = config.map_err(|e| anyhow::anyhow!("invalid configuration: {e}")).and_then(|c| run(c, &args));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The period of the epoch that bounds a callback's time.
const EPOCH_TICK_MS: u64 = 10;

fn run(mut config: Config, args: &Args) -> anyhow::Result<()> {
    if let Some(n) = args.concurrency {
        config.listener.workers = n;
    }
    let workers = config.workers();
    let mut engine_config = wasmtime::Config::new();
    engine_config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    if args.wasm_perfmap {
        engine_config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    // a callback that runs too long is interrupted through epochs: a thread ticks every EPOCH_TICK
    let callback_timeout = config.wasm.callback_timeout.0;
    engine_config.epoch_interruption(callback_timeout > 0);
    let engine = wasmtime::Engine::new(&engine_config).map_err(|e| anyhow::anyhow!("wasmtime: {e:#}"))?;
    let limits = equilibrio_host::context::VmLimits {
        max_memory_bytes: config.wasm.max_memory_mb << 20,
        deadline_ticks: (callback_timeout > 0).then(|| callback_timeout.div_ceil(EPOCH_TICK_MS) + 1),
    };
    if callback_timeout > 0 {
        let ticking = engine.clone();
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(EPOCH_TICK_MS));
                ticking.increment_epoch();
            }
        })?;
    }
    let mut compiled = std::collections::HashMap::new();
    let mut load = |list: &[equilibrio_host::config::PluginConfig], key: &str| -> anyhow::Result<Vec<Arc<Plugin>>> {
        list.iter()
            .enumerate()
            .map(|(i, p)| {
                Plugin::load(&engine, p, &mut compiled)
                    .map(Arc::new)
                    .map_err(|e| anyhow::anyhow!("`{key}[{i}].file`: {e}"))
            })
            .collect()
    };
    let filters = load(&config.http_filters, "http_filters")?;
    let services = load(&config.wasm_services, "wasm_services")?;
    let stats = Arc::new(Stats::default());
    let clusters = Arc::new(config.clusters.clone());
    let env = Arc::new(Env {
        stats: stats.clone(),
        shared: Arc::new(SharedData::default()),
        log_level: config.log_level,
        clusters: config.clusters.keys().cloned().collect(),
        route_cluster: config.route.cluster.clone(),
        limits,
    });
    let config = Arc::new(config);
    let shared = Arc::new(Shared {
        config: config.clone(),
        engine,
        filters,
        services,
        env,
        stats: stats.clone(),
        clusters,
        connections: AtomicUsize::new(0),
        retry_budget: Default::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // singleton services first, so that their tables are being fetched while workers start
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let services = worker::spawn_services(shared.clone(), stop_rx.clone(), ready_tx)?;
    ready_rx.recv().context("the wasm services thread ended")?.map_err(anyhow::Error::msg)?;

    let listeners = worker::bind_listeners(config.listener.address, workers)
        .with_context(|| format!("`listener.address`: cannot listen on {}", config.listener.address))?;
    let listen_addr = listeners.first().map(|l| l.local_addr()).transpose()?.context("no listener")?;
    let mut threads = Vec::with_capacity(workers);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (i, l) in listeners.into_iter().enumerate() {
        threads.push(worker::spawn_worker(i, l, shared.clone(), stop_rx.clone(), ready_tx.clone())?);
    }
    drop(ready_tx);
    for _ in 0..workers {
        ready_rx.recv().context("a worker thread ended")?.map_err(anyhow::Error::msg)?;
    }

    release_startup_memory();

    let admin_listener = std::net::TcpListener::bind(config.admin.address)
        .with_context(|| format!("`admin.address`: cannot listen on {}", config.admin.address))?;
    admin_listener.set_nonblocking(true)?;
    let admin_addr = admin_listener.local_addr()?;
    admin::spawn(Arc::new(Admin { stats, listener: listen_addr, started: std::time::Instant::now() }), admin_listener)?;
    if let Some(path) = &args.admin_address_path {
        std::fs::write(path, admin_addr.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!("equilibrio-host listening on {listen_addr} with {workers} workers; admin on {admin_addr}");

    wait_for_signal()?;
    tracing::info!("shutting down: no new connections; draining for up to {} ms", config.listener.drain_timeout.0);
    let _ = stop_tx.send(true);
    for t in threads {
        if t.join().is_err() {
            bail!("a worker thread panicked");
        }
    }
    let _ = services.join();
    tracing::info!("stopped");
    Ok(())
}

/// Hands the allocator's free pages back to the system once every VM is up. Compiling the filters with Cranelift
/// leaves about 12 MB of freed heap behind that glibc keeps mapped (RSS idle 34 MB before, 22 MB after, with the
/// profiling build; `scripts/bench` prints the figure). musl returns free memory by itself.
#[allow(unsafe_code)]
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's own free lists, under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            r = tokio::signal::ctrl_c() => r?,
        }
        Ok(())
    })
}
