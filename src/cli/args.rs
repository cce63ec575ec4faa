//! The command line's shape: every clap type, and nothing else. It names
//! only clap, std and `crate::config::LogFormat`, because `build.rs`
//! includes this file to write the shell completions and the man page
//! from the same definitions the binary parses with.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

/// `0.1.0 (rev 1a2b3c4d5e6f)`: the revision is set by `build.rs` (from
/// `git rev-parse`, "unknown" outside a checkout), so a binary in the
/// field says which commit it was built from.
pub const VERSION: &str = match option_env!("BUILD_VERSION_WITH_REV") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The spellings `--log-format` accepts; listed here (not left to
/// `LogFormat::from_str`) so completions and the man page can offer them.
/// A unit test holds them equal to what `log.format` accepts.
pub const LOG_FORMATS: [&str; 2] = ["text", "json"];

#[derive(Debug, Parser)]
#[command(
    name = "scaiwave",
    version = VERSION,
    about = "Federation server for the ScaiWave chat platform"
)]
pub struct Cli {
    /// Configuration file (TOML). Also SCAIWAVE_CONFIG.
    #[arg(long, global = true, env = "SCAIWAVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json (overrides log.format).
    #[arg(
        long,
        global = true,
        value_parser = PossibleValuesParser::new(LOG_FORMATS)
            .try_map(|s| s.parse::<LogFormat>()),
    )]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve,
    /// Administration (through the running server, or on the stopped
    /// server's data dir).
    Admin(AdminArgs),
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The tenant to act on (default: the first tenant, the
    /// configuration's server_name).
    #[arg(long, global = true)]
    pub tenant: Option<String>,
    /// Print the answer as one JSON value, for scripts (commands that
    /// print JSON anyway print the same).
    // Its own id: `policy set`'s argument is already called `json`.
    #[arg(id = "json_output", long = "json", global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Admin,
}

impl From<Admin> for AdminArgs {
    /// The command for the first tenant.
    fn from(command: Admin) -> AdminArgs {
        AdminArgs {
            tenant: None,
            json: false,
            command,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Admin {
    /// Federation: keys, policy, peers and the handshake check.
    #[command(subcommand)]
    Federation(Federation),
    /// Local participants and their tokens.
    #[command(subcommand)]
    Participant(ParticipantCmd),
    /// The tenants of this instance (SPEC §14).
    #[command(subcommand)]
    Tenant(TenantCmd),
}

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Add a tenant; prints its first admin's token once, as JSON.
    Create {
        server_name: String,
        /// Its certificate (PEM); without it, in self-signed mode, the
        /// local CA issues one.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Every tenant, with its federation switch.
    List,
    /// Turn a tenant's federation on or off (queued traffic is held).
    #[command(subcommand)]
    Federation(TenantSwitch),
}

#[derive(Debug, Subcommand)]
pub enum TenantSwitch {
    /// Federate again, and send what was held.
    Enable { server_name: String },
    /// Refuse S2S (403 SW_FED_TENANT_DISABLED) and send nothing.
    Disable { server_name: String },
}

#[derive(Debug, Subcommand)]
pub enum Federation {
    /// The signing key peers verify us with.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Which servers we federate with (SPEC §7).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Peers with their health, as a table (or JSON with --json).
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
    /// Print the policy as JSON.
    Show,
    /// Partial update, e.g. `set '{"allowed_peers": ["b.example.com"]}'`.
    Set { json: String },
}

#[derive(Debug, Subcommand)]
pub enum ParticipantCmd {
    /// Create a participant; prints its FQID and its token (shown once).
    Create {
        local_id: String,
        /// With power_level admin.
        #[arg(long)]
        admin: bool,
        /// The name others see (default: the local id).
        #[arg(long)]
        display_name: Option<String>,
    },
}
