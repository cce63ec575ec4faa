//! `scaiwave admin federation check` (SPEC §13) against real peers.

use std::collections::BTreeMap;

use scaiwave::cli::{execute, Admin, Federation};
use serde_json::json;

use crate::testnet;

/// `check` run on `from` against `peer` (a short name; others as they are).
async fn check(net: &testnet::TestNet, from: &str, peer: &str) -> String {
    let cmd = Admin::Federation(Federation::Check {
        server_name: net.name(peer),
    });
    let out = execute(net.server(from).app(), cmd.into()).await.unwrap();
    // The exit code (1 on a failed step) agrees with the summary line.
    assert_eq!(
        out.succeeded,
        out.output.ends_with("all checks passed"),
        "{}",
        out.output
    );
    out.output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_failing_step_with_its_code_and_fix() {
    // x.test resolves to a closed loopback port: nothing answers there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let extra = BTreeMap::from([("x.test".to_string(), closed)]);
    let mut net = testnet::start_with_extra(&["a.test", "b.test"], extra, |_, _| {}).await;
    let (a, b) = (net.name("a.test"), net.name("b.test"));

    let out = check(&net, "a.test", "b.test").await;
    assert!(out.ends_with(&format!("{b}: all checks passed")), "{out}");
    for step in [
        "own descriptor",
        "peer descriptor",
        "protocol versions",
        "clock skew",
        "our policy",
        "their policy",
        "last delivery",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("OK") && l.contains(step)),
            "{step} in {out}"
        );
    }

    // b.test refuses a.test: the signed probe learns it.
    net.set_policy("b.test", json!({"denied_peers": [a]})).await;
    let out = check(&net, "a.test", "b.test").await;
    assert!(
        out.contains("FAIL  their policy") && out.contains("SW_FED_POLICY_REJECTED"),
        "{out}"
    );
    assert!(
        out.contains(&format!("fix: {b}'s admin adds {a} to allowed_peers")),
        "{out}"
    );

    // Our own policy, checked before anything is sent.
    net.set_policy("a.test", json!({"default_mode": "invite_only"}))
        .await;
    let out = check(&net, "a.test", "b.test").await;
    assert!(
        out.contains("FAIL  our policy") && out.contains("SW_FED_PEER_UNKNOWN"),
        "{out}"
    );

    // Nothing at the peer's address.
    let out = check(&net, "a.test", "x.test").await;
    assert!(out.contains("FAIL  peer descriptor"), "{out}");
    assert!(out.ends_with("check(s) failed"), "{out}");
    net.stop_all().await;
}
