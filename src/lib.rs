//! scaiwave: a federation server for the ScaiWave chat platform.
//!
//! # Layout
//! - [`config`], [`limits`], [`clock`], [`error`], [`ids`]: the ground rules.
//! - [`storage`]: sled trees behind typed functions (only it touches sled).
//! - [`federation`]: wire types, signing (RFC 9421 requests, JCS events),
//!   keys, policy, the verifier cache, outbound client, inbound `/send`,
//!   and the delivery loop.
//! - [`rooms`]: hosts, replicas, membership, invitations.
//! - [`api`]: warp routes over rustls (S2S, admin, client).
//! - [`app`], [`server`]: the shared state and starting/stopping it.
//! - [`cli`]: the `scaiwave` command line.
//!
//! See ARCHITECTURE.md for the codemap and invariants.

pub mod api;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod federation;
pub mod ids;
pub mod limits;
pub mod protocol;
pub mod rooms;
pub mod server;
pub mod storage;
pub mod tls;
