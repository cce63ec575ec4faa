//! scaiwave: a federation server for the ScaiWave chat platform.
//!
//! # Layout
//! Lowest layer first; a module names only its own layer and those below
//! (checked by `tests/it/tidy.rs`).
//! - [`error`], [`ids`], [`limits`], [`clock`], [`config`], [`tls`],
//!   [`metrics`]: the ground rules.
//! - [`protocol`]: the formats two servers agree on (events, JCS, RFC 9421
//!   signatures, wire types), pure.
//! - [`storage`]: sled trees behind typed functions (only it touches sled).
//! - [`federation`]: talking to peers: §4 authentication, our keys and
//!   policy, peers' keys, outbound HTTPS and the S2S calls. No rooms.
//! - [`rooms`]: hosts, replicas, membership, invitations, an inbound `/send`.
//!   No HTTP.
//! - [`delivery`]: the per-peer outbound queues, drained.
//! - [`api`]: HTTPS routes (S2S, admin, client); the only place statuses
//!   are chosen.
//! - [`app`], [`server`]: composition: building the layers, starting and
//!   stopping tasks.
//! - [`cli`]: the `scaiwave` command line and the admin socket.
//!
//! See ARCHITECTURE.md for the codemap and invariants.

pub mod api;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod error;
pub mod federation;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod rooms;
pub mod server;
pub mod storage;
pub mod tls;
