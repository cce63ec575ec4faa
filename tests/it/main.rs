//! The one integration-test binary: real servers over loopback HTTPS.

mod federation;
mod refusals;
mod testnet;
