//! The `scaiwave` command line (SPEC §12): one closed [`Command`] enum.
//! Admin commands open the database directly and call the same functions
//! the HTTP admin API and the timers call.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::app::App;
use crate::clock::Clock;
use crate::config::{Config, LogFormat};
use crate::error::Result;
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

/// Run an admin command against the database in `config.data_dir`.
pub fn run_admin(config: Config, cmd: Admin) -> Result<()> {
    let app = App::open(config, Clock::system())?;
    match cmd {
        Admin::Federation(Federation::Key(KeyCmd::Generate)) => {
            let rec = app.keys.generate(app.clock.now_ms())?;
            println!("generated key {}", rec.key_id);
        }
        Admin::Federation(Federation::Key(KeyCmd::Rotate(a))) => {
            let rec = crate::server::rotate(&app, a.revoke_previous)?;
            println!("rotated; new key {}", rec.key_id);
        }
        Admin::Federation(Federation::Key(KeyCmd::Show)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::api::admin::identity(&app))
                    .unwrap_or_default()
            );
        }
        Admin::Federation(Federation::Policy(PolicyCmd::Show)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&app.policy()).unwrap_or_default()
            );
        }
        Admin::Federation(Federation::Policy(PolicyCmd::Set { json })) => {
            let patch: serde_json::Value = serde_json::from_str(&json).map_err(|e| {
                crate::error::Error::bad_request(format!("the policy update is not JSON: {e}"))
            })?;
            let next = app.policy().patched(&patch)?;
            app.set_policy(next.clone())?;
            println!(
                "{}",
                serde_json::to_string_pretty(&next).unwrap_or_default()
            );
        }
        Admin::Federation(Federation::Peers) => {
            println!(
                "{:<32} {:<8} {:>6} {:>6} {:>6}  {:<25} LAST_ERROR",
                "SERVER_NAME", "STATUS", "QUEUE", "SENT", "RECV", "LAST_SEEN"
            );
            for p in crate::api::admin::peers(&app)? {
                let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
                let n = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                let err = p
                    .get("last_error")
                    .and_then(|e| e.get("code"))
                    .and_then(|c| c.as_str())
                    .unwrap_or("-");
                println!(
                    "{:<32} {:<8} {:>6} {:>6} {:>6}  {:<25} {err}",
                    s("server_name"),
                    s("status"),
                    n("queue_depth"),
                    n("events_sent_24h"),
                    n("events_received_24h"),
                    s("last_seen")
                );
            }
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
            let token = app.create_participant(
                &local,
                display_name.as_deref().unwrap_or(&local_id),
                power,
            )?;
            println!("{}\n{token}", app.fqid(&local));
        }
    }
    app.store.flush_blocking()?;
    Ok(())
}

/// Validate a server name given on the command line.
pub fn server_name_arg(s: &str) -> Result<ServerName> {
    ServerName::parse(s)
}
