//! The formats two servers agree on, as pure functions and types: no IO,
//! no clock, no state.
//!
//! - [`wire`]: descriptor and `/send` envelope types.
//! - [`event`] + [`canonical`]: signed events over RFC 8785 JCS.
//! - [`httpsig`]: the RFC 9421 request-signature profile and RFC 9530
//!   `Content-Digest`.

pub mod canonical;
pub mod event;
pub mod httpsig;
pub mod wire;
