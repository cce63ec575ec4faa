//! The one integration-test binary: real servers over loopback HTTPS.

mod delivery;
mod federation;
mod process;
mod refusals;
mod testnet;
