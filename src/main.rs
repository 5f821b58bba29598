//! The `pgstash` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgstash::config::Config;
use pgstash::listener::{self, Proxy};

/// Every query allocates and frees small buffers on one thread at a high
/// rate; mimalloc's thread-local free lists serve them without the locks
/// and consolidation passes of the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pgstash",
    version,
    about = "A caching, pooling sidecar proxy for PostgreSQL"
)]
struct Cli {
    /// Configuration file (see the shipped proxy.toml).
    #[arg(long, global = true, env = "PGSTASH_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, HOST:PORT (overrides `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Default upstream: postgres://[user[:password]@]host:port[/database].
    /// Client database and user names pass through to this server.
    #[arg(long)]
    upstream: Option<String>,
    /// Address of the HTTP endpoint for /metrics, /healthz and /readyz.
    #[arg(long)]
    metrics: Option<String>,
    /// Redis for the shared tier and invalidation bus: redis://host:port.
    #[arg(long)]
    redis: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print it, secrets masked.
    CheckConfig,
}

fn load(cli: &Cli) -> Result<Config, String> {
    let mut config = Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(listen) = &cli.listen {
        config.listen = listen.clone();
    }
    if let Some(redis) = &cli.redis {
        config.redis.url = redis.clone();
    }
    if let Some(metrics) = &cli.metrics {
        config.metrics_listen = metrics.clone();
    }
    if let Some(url) = &cli.upstream {
        config.apply_upstream_url(url).map_err(|e| e.to_string())?;
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn init_logging(config: &Config) {
    pgstash::admin::logging::init(&config.log_level, config.log_format == "json");
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// SIGHUP re-reads the configuration file, as RELOAD does.
fn spawn_reload_on_sighup(proxy: std::sync::Arc<Proxy>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match pgstash::admin::console::reload(&proxy) {
                Ok(outcome) => tracing::info!(outcome, "SIGHUP"),
                Err(e) => tracing::error!(error = %e, "reload failed; old configuration kept"),
            }
        }
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pgstash: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        print!("{}", config.to_masked_toml());
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let config_path = cli.config.clone();
    // 0: one per CPU the process may use (a cgroup quota counts), as tokio
    // would choose.
    let workers = match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // One worker runs on the calling thread: the single-threaded scheduler
    // does no work-stealing bookkeeping (atomics, clock reads per tick),
    // which the multi-threaded one does even with one worker.
    let mut runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        runtime.worker_threads(workers);
        runtime
    };
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgstash: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match listener::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("pgstash: cannot listen on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(listen = %config.listen, upstream = %config.upstream.host, "pgstash listening");
        let proxy = match Proxy::new(config) {
            Ok(proxy) => proxy,
            Err(e) => {
                eprintln!("pgstash: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(path) = &config_path {
            let _ = proxy.config_path.set(path.clone());
        }
        spawn_reload_on_sighup(proxy.clone());
        listener::run(listener, proxy, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}
