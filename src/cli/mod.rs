//! The `scaiwave` command line (SPEC §12): one closed [`Command`] enum.
//! Admin commands go through the running server's admin socket (started by
//! [`serve`]), or open the database directly when none runs; either way
//! they call the same functions the HTTP admin API and the timers call.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::app::App;
use crate::clock::Clock;
use crate::config::{Config, LogFormat};
use crate::error::{Error, Result};
use crate::ids::{LocalId, ServerName};
use crate::storage::PowerLevel;

#[derive(Debug, Parser)]
#[command(
    name = "scaiwave",
    version,
    about = "Federation server for the ScaiWave chat platform"
)]
pub struct Cli {
    /// Configuration file (TOML). Also SCAIWAVE_CONFIG.
    #[arg(long, global = true, env = "SCAIWAVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json (overrides log.format).
    #[arg(long, global = true)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve,
    /// Administration.
    #[command(subcommand)]
    Admin(Admin),
}

#[derive(Debug, Subcommand)]
pub enum Admin {
    #[command(subcommand)]
    Federation(Federation),
    #[command(subcommand)]
    Participant(ParticipantCmd),
}

#[derive(Debug, Subcommand)]
pub enum Federation {
    #[command(subcommand)]
    Key(KeyCmd),
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Peers with their health, as a table.
    Peers,
    /// Run the handshake troubleshooting steps against a peer (SPEC §13).
    Check { server_name: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create the first signing key.
    Generate,
    /// Replace the current key; the old one stays valid for key_overlap.
    Rotate(RotateArgs),
    /// Print the identity (key id, public key, old keys).
    Show,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// For a compromised key: the previous key stops verifying at once.
    #[arg(long)]
    pub revoke_previous: bool,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    Show,
    /// Partial update, e.g. `set '{"allowed_peers": ["b.example.com"]}'`.
    Set {
        json: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ParticipantCmd {
    Create {
        local_id: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        display_name: Option<String>,
    },
}

/// The admin socket in the data dir: while `serve` runs, admin commands
/// are executed by the server through it (sled allows one process).
pub const ADMIN_SOCKET: &str = "admin.sock";

/// An admin command line as it travels over the socket.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SocketRequest {
    pub argv: Vec<String>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SocketAnswer {
    pub ok: bool,
    pub output: String,
}

/// Run an admin command: through the running server's socket if there is
/// one, else against the database directly. Either way [`execute`] runs it.
pub fn run_admin(config: Config, argv: Vec<String>, cmd: Admin) -> Result<String> {
    let socket = config.data_dir.join(ADMIN_SOCKET);
    if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
        return through_socket(stream, argv);
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| Error::internal("runtime", e))?;
    runtime.block_on(async {
        let app = App::open(config, Clock::system())?;
        let out = execute(&app, cmd).await;
        app.store.flush_blocking()?;
        out
    })
}

fn through_socket(mut stream: std::os::unix::net::UnixStream, argv: Vec<String>) -> Result<String> {
    use std::io::{BufRead, Write};
    let io = |e: std::io::Error| Error::internal("admin socket", e);
    let mut line =
        serde_json::to_vec(&SocketRequest { argv }).map_err(|e| Error::internal("encode", e))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io)?;
    let answer: SocketAnswer =
        serde_json::from_str(&answer).map_err(|e| Error::internal("admin socket answer", e))?;
    if answer.ok {
        Ok(answer.output)
    } else {
        Err(Error::bad_request(answer.output))
    }
}

/// Parse an argv received over the socket into an admin command.
pub(crate) fn parse_admin_argv(argv: &[String]) -> std::result::Result<Admin, String> {
    let cli =
        Cli::try_parse_from(std::iter::once("scaiwave".to_string()).chain(argv.iter().cloned()))
            .map_err(|e| e.to_string())?;
    match cli.command {
        Command::Admin(a) => Ok(a),
        Command::Serve => Err("only admin commands go through the admin socket".into()),
    }
}

/// Execute one admin command against a running (or just opened) app.
pub async fn execute(app: &App, cmd: Admin) -> Result<String> {
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    Ok(match cmd {
        Admin::Federation(Federation::Key(KeyCmd::Generate)) => {
            let rec = app.fed.keys.generate(app.clock.now_ms())?;
            format!("generated key {}", rec.key_id)
        }
        Admin::Federation(Federation::Key(KeyCmd::Rotate(a))) => {
            let rec = app.fed.rotate(a.revoke_previous)?;
            format!("rotated; new key {}", rec.key_id)
        }
        Admin::Federation(Federation::Key(KeyCmd::Show)) => {
            pretty(&crate::api::admin::identity(&app.services))
        }
        Admin::Federation(Federation::Policy(PolicyCmd::Show)) => {
            pretty(&serde_json::to_value(app.fed.policy()).unwrap_or_default())
        }
        Admin::Federation(Federation::Policy(PolicyCmd::Set { json })) => {
            let patch: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| Error::bad_request(format!("the policy update is not JSON: {e}")))?;
            let next = app.fed.policy().patched(&patch)?;
            app.fed.set_policy(next.clone())?;
            pretty(&serde_json::to_value(next).unwrap_or_default())
        }
        Admin::Federation(Federation::Peers) => {
            peers_table(&crate::api::admin::peers(&app.services)?)
        }
        Admin::Federation(Federation::Check { server_name }) => {
            let peer = ServerName::parse(&server_name)?;
            let findings = crate::federation::check::check(&app.fed, &peer).await;
            let failed = findings.iter().filter(|f| !f.ok).count();
            let mut text: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
            text.push(if failed == 0 {
                format!("{peer}: all checks passed")
            } else {
                format!("{peer}: {failed} check(s) failed")
            });
            text.join("\n")
        }
        Admin::Participant(ParticipantCmd::Create {
            local_id,
            admin,
            display_name,
        }) => {
            let local = LocalId::parse(&local_id)?;
            let power = if admin {
                PowerLevel::Admin
            } else {
                PowerLevel::Member
            };
            let token = app.rooms.create_participant(
                &local,
                display_name.as_deref().unwrap_or(&local_id),
                power,
            )?;
            format!("{}\n{token}", app.rooms.fqid(&local))
        }
    })
}

fn peers_table(peers: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<32} {:<8} {:>6} {:>6} {:>6}  {:<22} {:<22} LAST_ERROR\n",
        "SERVER_NAME", "STATUS", "QUEUE", "SENT", "RECV", "LAST_SEEN", "NEXT_RETRY"
    );
    for p in peers {
        let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
        let n = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let err = p
            .get("last_error")
            .and_then(|e| e.get("code"))
            .and_then(|c| c.as_str())
            .unwrap_or("-");
        out.push_str(&format!(
            "{:<32} {:<8} {:>6} {:>6} {:>6}  {:<22} {:<22} {err}\n",
            s("server_name"),
            s("status"),
            n("queue_depth"),
            n("events_sent_24h"),
            n("events_received_24h"),
            s("last_seen"),
            s("next_retry_at"),
        ));
    }
    out
}

/// `scaiwave serve`: the server (SPEC §12) and its admin socket, until
/// the caller stops it.
pub async fn serve(config: Config, clock: Clock) -> Result<crate::server::Running> {
    let running = crate::server::start(config, clock).await?;
    let app = running.app.clone();
    app.tasks.spawn(serve_socket(app.clone()));
    Ok(running)
}

/// Serve the admin socket until shutdown. The socket file is created
/// with mode 0600 inside the data dir: only the server's user may use it.
pub(crate) async fn serve_socket(app: std::sync::Arc<App>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let path = app.config.data_dir.join(ADMIN_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no admin socket; admin commands need the server stopped");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = app.shutdown.cancelled() => break,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match serde_json::from_str::<SocketRequest>(&line) {
                Err(e) => SocketAnswer {
                    ok: false,
                    output: format!("bad admin request: {e}"),
                },
                Ok(req) => match parse_admin_argv(&req.argv) {
                    Err(e) => SocketAnswer {
                        ok: false,
                        output: e,
                    },
                    Ok(cmd) => match execute(&app, cmd).await {
                        Ok(output) => SocketAnswer { ok: true, output },
                        Err(e) => SocketAnswer {
                            ok: false,
                            output: e.to_string(),
                        },
                    },
                },
            };
            let mut bytes = serde_json::to_vec(&answer).unwrap_or_default();
            bytes.push(b'\n');
            let _ = write.write_all(&bytes).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}
