//! The one integration-test binary: real servers over loopback HTTPS.

mod admin;
mod calls;
mod check;
mod console;
mod crash;
mod delivery;
mod disk;
mod federation;
mod hostile;
mod hostile_rooms;
mod interop;
mod metrics;
mod process;
mod refusals;
mod rooms;
mod tenants;
mod testnet;
mod tidy;
