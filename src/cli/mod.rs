//! The `scaiwave` command line (SPEC §12): one closed [`Command`] enum.
//! Admin commands go through the running server's admin socket (started by
//! [`serve`]), or open the database directly when none runs; either way
//! they call the same functions the HTTP admin API and the timers call.
//! The clap types themselves are in `args.rs`, which `build.rs` shares.

mod args;

use std::path::PathBuf;

use clap::Parser;

pub use args::*;

use crate::app::App;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::{LocalId, ServerName};
use crate::storage::PowerLevel;

/// The admin socket in the data dir: while `serve` runs, admin commands
/// are executed by the server through it (sled allows one process).
pub const ADMIN_SOCKET: &str = "admin.sock";

/// An admin command line as it travels over the socket.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SocketRequest {
    pub argv: Vec<String>,
    /// The caller's working directory: relative paths in the command are
    /// its, not the server's.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SocketAnswer {
    /// False when the command itself was refused: `output` is the error.
    pub ok: bool,
    pub output: String,
    /// False when the command ran but what it reports failed (a
    /// `federation check` with a failed step): the CLI exits 1.
    #[serde(default = "yes")]
    pub succeeded: bool,
}

fn yes() -> bool {
    true
}

/// What an admin command printed, and whether what it reports succeeded:
/// `federation check` prints its findings either way, and a script reads
/// the exit code (1 when a check failed).
#[derive(Debug)]
pub struct Outcome {
    pub output: String,
    pub succeeded: bool,
}

/// Run an admin command: through the running server's socket if there is
/// one, else against the database directly. Either way [`execute`] runs it.
pub fn run_admin(config: Config, argv: Vec<String>, cmd: AdminArgs) -> Result<Outcome> {
    let socket = config.data_dir.join(ADMIN_SOCKET);
    if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
        return through_socket(stream, argv);
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| Error::internal("runtime", e))?;
    runtime.block_on(async {
        let app = App::open(config, Clock::system())?;
        let out = execute(&app, cmd).await;
        app.first.store.flush_blocking()?;
        out
    })
}

fn through_socket(
    mut stream: std::os::unix::net::UnixStream,
    argv: Vec<String>,
) -> Result<Outcome> {
    use std::io::{BufRead, Write};
    let io = |e: std::io::Error| Error::internal("admin socket", e);
    let request = SocketRequest {
        argv,
        cwd: std::env::current_dir().ok(),
    };
    let mut line = serde_json::to_vec(&request).map_err(|e| Error::internal("encode", e))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io)?;
    let answer: SocketAnswer =
        serde_json::from_str(&answer).map_err(|e| Error::internal("admin socket answer", e))?;
    if answer.ok {
        Ok(Outcome {
            output: answer.output,
            succeeded: answer.succeeded,
        })
    } else {
        Err(Error::bad_request(answer.output))
    }
}

/// Parse a request received over the socket into an admin command, its
/// relative paths taken from the caller's working directory.
pub(crate) fn parse_admin_request(req: &SocketRequest) -> std::result::Result<AdminArgs, String> {
    let argv = req.argv.iter().cloned();
    let cli = Cli::try_parse_from(std::iter::once("scaiwave".to_string()).chain(argv))
        .map_err(|e| e.to_string())?;
    let Command::Admin(mut args) = cli.command else {
        return Err("only admin commands go through the admin socket".into());
    };
    if let (Some(cwd), Admin::Tenant(TenantCmd::Create { cert, key, .. })) =
        (&req.cwd, &mut args.command)
    {
        for path in [cert, key].into_iter().flatten() {
            *path = cwd.join(&*path);
        }
    }
    Ok(args)
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Execute one admin command against a running (or just opened) app, on
/// the tenant it names. With `--json` every answer is one JSON value;
/// without it, the same facts as text for people.
pub async fn execute(app: &App, args: AdminArgs) -> Result<Outcome> {
    let tenant = app.tenant(args.tenant.as_deref())?;
    let json = args.json;
    let mut succeeded = true;
    let answer = match args.command {
        Admin::Tenant(cmd) => tenant_command(app, cmd)?,
        Admin::Federation(Federation::Key(KeyCmd::Generate)) => {
            let rec = tenant.fed.keys.generate(app.clock.now_ms())?;
            Answer::both(
                format!("generated key {}", rec.key_id),
                serde_json::json!({ "key_id": rec.key_id.to_string() }),
            )
        }
        Admin::Federation(Federation::Key(KeyCmd::Rotate(a))) => {
            let rec = tenant.fed.rotate(a.revoke_previous)?;
            Answer::both(
                format!("rotated; new key {}", rec.key_id),
                serde_json::json!({
                    "key_id": rec.key_id.to_string(),
                    "previous_revoked": a.revoke_previous,
                }),
            )
        }
        Admin::Federation(Federation::Key(KeyCmd::Show)) => {
            Answer::Json(crate::api::admin::identity(&tenant.services))
        }
        Admin::Federation(Federation::Policy(PolicyCmd::Show)) => {
            Answer::Json(serde_json::to_value(tenant.fed.policy()).unwrap_or_default())
        }
        Admin::Federation(Federation::Policy(PolicyCmd::Set { json })) => {
            let patch: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| Error::bad_request(format!("the policy update is not JSON: {e}")))?;
            let next = tenant.fed.policy().patched(&patch)?;
            tenant.fed.set_policy(next.clone())?;
            Answer::Json(serde_json::to_value(next).unwrap_or_default())
        }
        Admin::Federation(Federation::Peers) => {
            let peers = crate::api::admin::peers(&tenant.services)?;
            Answer::both(peers_table(&peers), serde_json::json!({ "peers": peers }))
        }
        Admin::Federation(Federation::Check { server_name }) => {
            let peer = ServerName::parse(&server_name)?;
            let findings = crate::federation::check::check(&tenant.fed, &peer).await;
            let failed = findings.iter().filter(|f| !f.ok).count();
            succeeded = failed == 0;
            let mut text: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
            text.push(if failed == 0 {
                format!("{peer}: all checks passed")
            } else {
                format!("{peer}: {failed} check(s) failed")
            });
            let steps: Vec<serde_json::Value> = findings
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "step": f.step,
                        "ok": f.ok,
                        "code": f.code.map(|c| c.as_str()),
                        "detail": f.detail,
                        "fix": f.fix,
                    })
                })
                .collect();
            Answer::both(
                text.join("\n"),
                serde_json::json!({
                    "server_name": peer.as_str(),
                    "ok": failed == 0,
                    "failed": failed,
                    "findings": steps,
                }),
            )
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
            let token = tenant.rooms.create_participant(
                &local,
                display_name.as_deref().unwrap_or(&local_id),
                power,
            )?;
            let fqid = tenant.rooms.fqid(&local);
            Answer::both(
                format!("{fqid}\n{token}"),
                serde_json::json!({ "fqid": fqid.to_string(), "token": token }),
            )
        }
    };
    Ok(Outcome {
        output: answer.render(json),
        succeeded,
    })
}

/// What a command answers: JSON only (printed the same either way), or
/// text for people with the JSON `--json` asks for.
enum Answer {
    Json(serde_json::Value),
    Both {
        text: String,
        json: serde_json::Value,
    },
}

impl Answer {
    fn both(text: String, json: serde_json::Value) -> Answer {
        Answer::Both { text, json }
    }

    fn render(self, json: bool) -> String {
        match (self, json) {
            (Answer::Json(v), _) | (Answer::Both { json: v, .. }, true) => pretty(&v),
            (Answer::Both { text, .. }, false) => text,
        }
    }
}

/// `admin tenant …`: these name their tenant themselves.
fn tenant_command(app: &App, cmd: TenantCmd) -> Result<Answer> {
    Ok(match cmd {
        TenantCmd::Create {
            server_name,
            cert,
            key,
        } => {
            let name = ServerName::parse(&server_name)?;
            let created = app.create_tenant(&name, cert.zip(key))?;
            Answer::Json(serde_json::to_value(&created).map_err(|e| Error::internal("encode", e))?)
        }
        TenantCmd::List => {
            let rows: Vec<serde_json::Value> = app
                .tenants()
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "server_name": t.server_name.as_str(),
                        "first": t.server_name == app.first.server_name,
                        "federation_enabled": t.fed.enabled(),
                    })
                })
                .collect();
            Answer::Json(serde_json::json!({ "tenants": rows }))
        }
        TenantCmd::Federation(switch) => {
            let (server_name, on) = match switch {
                TenantSwitch::Enable { server_name } => (server_name, true),
                TenantSwitch::Disable { server_name } => (server_name, false),
            };
            let tenant = app.tenant(Some(&server_name))?;
            tenant.fed.set_enabled(on)?;
            Answer::both(
                format!(
                    "federation of {} is {}",
                    tenant.server_name,
                    if on { "on" } else { "off" }
                ),
                serde_json::json!({
                    "server_name": tenant.server_name.as_str(),
                    "federation_enabled": on,
                }),
            )
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

/// The answer to a command line that could not run.
fn refused(output: String) -> SocketAnswer {
    SocketAnswer {
        ok: false,
        output,
        succeeded: false,
    }
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
                Err(e) => refused(format!("bad admin request: {e}")),
                Ok(req) => match parse_admin_request(&req) {
                    Err(e) => refused(e),
                    Ok(cmd) => match execute(&app, cmd).await {
                        Ok(out) => SocketAnswer {
                            ok: true,
                            output: out.output,
                            succeeded: out.succeeded,
                        },
                        Err(e) => refused(e.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(argv: &[&str], cwd: Option<&str>) -> SocketRequest {
        SocketRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            cwd: cwd.map(PathBuf::from),
        }
    }

    #[test]
    fn relative_paths_over_the_socket_are_the_callers() {
        let argv = [
            "admin",
            "tenant",
            "create",
            "y.test",
            "--cert",
            "y.pem",
            "--key",
            "/etc/y.key",
        ];
        let args = parse_admin_request(&request(&argv, Some("/home/op"))).unwrap();
        let Admin::Tenant(TenantCmd::Create { cert, key, .. }) = args.command else {
            panic!("parsed as another command");
        };
        assert_eq!(cert.unwrap(), PathBuf::from("/home/op/y.pem"));
        assert_eq!(key.unwrap(), PathBuf::from("/etc/y.key"), "absolute stays");
    }

    /// Every command and subcommand says what it does in `--help`.
    #[test]
    fn every_command_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<Cli as clap::CommandFactory>::command(),
            "scaiwave",
            &mut missing,
        );
        assert_eq!(missing, Vec::<String>::new());
    }

    #[test]
    fn the_socket_takes_admin_commands_only_and_tenant_anywhere() {
        let err = parse_admin_request(&request(&["serve"], None)).unwrap_err();
        assert!(err.contains("only admin commands"), "{err}");
        for argv in [
            ["admin", "--tenant", "y.test", "federation", "peers"],
            ["admin", "federation", "peers", "--tenant", "y.test"],
        ] {
            let args = parse_admin_request(&request(&argv, None)).unwrap();
            assert_eq!(args.tenant.as_deref(), Some("y.test"));
        }
        let lone_cert = ["admin", "tenant", "create", "y.test", "--cert", "y.pem"];
        let err = parse_admin_request(&request(&lone_cert, None)).unwrap_err();
        assert!(err.contains("--key"), "{err}");
    }

    /// `build.rs` builds the completions and man pages with a stand-in
    /// `LogFormat` and takes the spellings from `LOG_FORMATS`: they must be
    /// exactly the ones `log.format` accepts, each naming its own variant.
    #[test]
    fn log_formats_are_the_ones_log_format_accepts() {
        use crate::config::LogFormat;
        // A new variant fails to compile here until it is listed.
        let all = |f: LogFormat| match f {
            LogFormat::Text | LogFormat::Json => f.as_str(),
        };
        let real: Vec<&str> = [LogFormat::Text, LogFormat::Json].map(all).to_vec();
        assert_eq!(real, LOG_FORMATS.to_vec());
        for name in LOG_FORMATS {
            assert_eq!(name.parse::<LogFormat>().unwrap().as_str(), name);
        }
        let cli = Cli::try_parse_from(["scaiwave", "--log-format", "json", "serve"]).unwrap();
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        let err = Cli::try_parse_from(["scaiwave", "--log-format", "xml", "serve"]).unwrap_err();
        assert!(err.to_string().contains("text, json"), "{err}");
    }

    #[test]
    fn version_names_the_revision() {
        let version = <Cli as clap::CommandFactory>::command().render_version();
        let expected = format!("scaiwave {} (rev ", env!("CARGO_PKG_VERSION"));
        assert!(version.starts_with(&expected), "{version}");
    }

    /// `--json` is accepted anywhere after `admin`, so it also survives the
    /// admin socket, which re-parses the argv from `admin` on.
    #[test]
    fn json_is_an_admin_option_anywhere() {
        for argv in [
            &["admin", "--json", "federation", "peers"][..],
            &["admin", "federation", "peers", "--json"],
            &["admin", "tenant", "--json", "list"],
        ] {
            let args = parse_admin_request(&request(argv, None)).unwrap();
            assert!(args.json, "{argv:?}");
        }
        let args = parse_admin_request(&request(&["admin", "federation", "peers"], None)).unwrap();
        assert!(!args.json);
    }

    /// Every admin command's leaf path, from the clap tree.
    fn admin_leaves() -> Vec<String> {
        fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            let subs: Vec<_> = cmd
                .get_subcommands()
                .filter(|s| s.get_name() != "help")
                .collect();
            if subs.is_empty() {
                out.push(path.trim().to_string());
            }
            for sub in subs {
                walk(sub, &format!("{path} {}", sub.get_name()), out);
            }
        }
        let cli = <Cli as clap::CommandFactory>::command();
        let admin = cli.find_subcommand("admin").unwrap();
        let mut out = Vec::new();
        walk(admin, "", &mut out);
        out.sort();
        out
    }

    /// With `--json`, every admin command prints one JSON value; the test
    /// runs each leaf of the command tree (a new command fails it until it
    /// is added here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_admin_command_prints_json_with_json() {
        let dir = tempfile::tempdir().unwrap();
        let env = [
            ("SCAIWAVE_DATA_DIR", dir.path().display().to_string()),
            ("SCAIWAVE_SERVER_NAME", "x.test".to_string()),
            // So that `key generate` has a first key to make.
            ("SCAIWAVE_FEDERATION__GENERATE_KEY_ON_START", "false".into()),
        ];
        let env = env.map(|(k, v)| (k.to_string(), v));
        let app = App::open(Config::load(None, env).unwrap(), Clock::system()).unwrap();
        let runs: &[(&str, &[&str], &str)] = &[
            ("federation key generate", &[], "key_id"),
            ("federation key show", &[], "key_id"),
            ("federation key rotate", &["--revoke-previous"], "key_id"),
            ("federation policy show", &[], "allowed_peers"),
            (
                "federation policy set",
                &[r#"{"allowed_peers": ["b.test"]}"#],
                "allowed_peers",
            ),
            ("federation peers", &[], "peers"),
            // Loopback is refused before any packet leaves: a quick failure.
            ("federation check", &["localhost:1"], "findings"),
            ("participant create", &["alice", "--admin"], "token"),
            ("tenant create", &["y.test"], "admin_token"),
            ("tenant list", &[], "tenants"),
            (
                "tenant federation disable",
                &["y.test"],
                "federation_enabled",
            ),
            (
                "tenant federation enable",
                &["y.test"],
                "federation_enabled",
            ),
        ];
        let mut covered: Vec<String> = runs.iter().map(|(c, _, _)| c.to_string()).collect();
        covered.sort();
        assert_eq!(covered, admin_leaves(), "every admin command is run here");
        for (command, rest, field) in runs {
            let mut argv = vec!["admin", "--json"];
            argv.extend(command.split(' '));
            argv.extend(rest.iter());
            let args = parse_admin_request(&request(&argv, None)).unwrap();
            let out = execute(&app, args).await.unwrap().output;
            let v: serde_json::Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("{command}: not JSON ({e}): {out}"));
            assert!(!v[field].is_null(), "{command}: no {field}: {out}");
        }
        // And the text answers stay text for people.
        let args = parse_admin_request(&request(&["admin", "federation", "peers"], None)).unwrap();
        let out = execute(&app, args).await.unwrap().output;
        assert!(out.starts_with("SERVER_NAME"), "{out}");
        app.first.store.flush_blocking().unwrap();
    }
}
