//! Federation: everything that crosses to another server.
//!
//! - [`wire`]: descriptor and `/send` envelope types; [`event`] +
//!   [`canonical`]: signed events over RFC 8785 JCS.
//! - [`httpsig`]: the RFC 9421 request-signature profile (pure functions).
//! - [`keys`]: our keys; [`verifier`]: peers' keys (descriptor cache).
//! - [`policy`]: whom we talk to; [`client`]: outbound HTTPS.
//! - [`inbound`]: §4 authentication and `/send`; [`delivery`]: the per-peer
//!   outbound queues; [`check`]: the handshake diagnostics of §13.

pub mod check;
pub mod client;
pub mod delivery;
pub mod inbound;
pub mod keys;
pub mod policy;
pub mod verifier;
