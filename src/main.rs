//! The `scaiwave` binary: parse the CLI, build one `Config`, run, and map
//! the result to an exit code (2 for configuration errors, 1 otherwise).

use std::process::ExitCode;

use clap::Parser;
use scaiwave::cli::{Cli, Command};
use scaiwave::config::{Config, LogFormat};

// With the system allocator, malloc and free took ~23 % of the CPU while
// draining a backlog (sled copies nodes, JSON allocates per value);
// with mimalloc its share was ~14 %, and it links into the static build.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's own option setter (linked in with the allocator); the
// option number is `mi_option_purge_delay` in mimalloc.h, the same in
// its v2 and v3.
extern "C" {
    fn mi_option_set(option: libc::c_int, value: libc::c_long);
}
const MI_OPTION_PURGE_DELAY: libc::c_int = 15;

/// Memory freed is returned to the kernel at once instead of after
/// mimalloc's default delay: while ingesting 200 000 events, pages freed
/// and not yet purged held about 35 MiB of RSS. The cost was within this
/// machine's run-to-run noise (membench ingest: 11 054–11 410 events/s
/// with it, 11 312–11 576 without).
fn allocator_returns_memory_at_once() {
    // SAFETY: sets one integer option; mimalloc reads it at each purge.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SCAIWAVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald and log files
    // would otherwise keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    allocator_returns_memory_at_once();
    // Everything this process writes (database, keys, tokens) is its
    // user's alone, whatever umask it was started with (SPEC §12).
    // SAFETY: umask only sets the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match &cli.config {
        Some(path) => Config::from_file(path, env),
        None => Config::load(None, env),
    };
    let mut config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(f) = cli.log_format {
        config.log.format = f;
    }
    init_logging(config.log.format);
    let result = match cli.command {
        Command::Serve => serve(config).map(|()| true),
        Command::Admin(cmd) => {
            let argv = admin_argv();
            scaiwave::cli::run_admin(config, argv, cmd)
                .map(|out| {
                    println!("{}", out.output);
                    out.succeeded
                })
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // The command ran and printed why (a failed check): exit 1 so a
        // script can tell, without an "error:" line of its own.
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The admin part of the command line (from `admin` on), which is what the
/// running server re-parses; global options were already applied here.
fn admin_argv() -> Vec<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if a == "--config" || a == "--log-format" {
            skip_value = true;
            continue;
        }
        if a.starts_with("--config=") || a.starts_with("--log-format=") {
            continue;
        }
        out.push(a);
    }
    out
}

/// Memory for a small box: transparent huge pages off for this process
/// (on a machine with THP "always", 43 MiB of a fresh server's 54 MiB
/// were huge pages it barely touched), and a runtime sized by `limits`
/// rather than by tokio's defaults (a worker per core, 512 blocking
/// threads).
fn serve(config: Config) -> anyhow::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only changes
    // how the kernel backs this process's future mappings; a kernel that
    // lacks it returns EINVAL, which costs only the memory it would save.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(scaiwave::limits::RUNTIME_WORKERS_MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(scaiwave::limits::BLOCKING_THREADS_MAX)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let running = scaiwave::cli::serve(config, scaiwave::clock::Clock::system()).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        systemd_notify(sd_notify::NotifyState::Ready);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        systemd_notify(sd_notify::NotifyState::Stopping);
        tracing::info!("shutting down: finishing in-flight requests, then flushing");
        running.stop().await;
        Ok(())
    })
}

/// Tell systemd (`Type=notify`) where the service stands: ready once the
/// listener accepts, stopping once SIGTERM came. Without `NOTIFY_SOCKET`
/// (not under systemd) it does nothing; a failure only costs systemd's
/// view of the state, so it is logged, not fatal.
fn systemd_notify(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
