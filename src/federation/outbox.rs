//! The doorbells of the per-peer queues: code that queues rows (rooms, in
//! the same write set as the event) or hears from a peer rings here, and
//! the delivery worker (`delivery/`, a layer above) answers.
//!
//! A peer's first ring sends its [`PeerSignals`] down a channel to the
//! worker, which starts that peer's task; later rings only notify it. So
//! the channel holds at most one message per peer ever rung, and nothing
//! here holds a handle on the layers above.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use crate::clock::Clock;
use crate::ids::ServerName;
use crate::storage::Store;

/// What one peer's delivery task waits on, shared with those who ring.
pub struct PeerSignals {
    /// New rows (or EDUs) were queued.
    pub queued: Notify,
    /// The peer talked to us: if we are backing off, try again now.
    pub inbound: Notify,
    /// When the task will try again (ms), 0 when it is not backing off.
    pub next_retry_at_ms: AtomicI64,
    /// Presence EDUs waiting for this peer: latest per sender, kept in
    /// memory only (they are ephemeral) and dropped after
    /// [`crate::limits::EDU_TTL_MS`]. (queued at ms, EDU)
    pub edus: Mutex<BTreeMap<String, (i64, serde_json::Value)>>,
}

/// Peers rung for the first time, for the delivery worker to start.
pub type NewPeers = mpsc::UnboundedReceiver<(ServerName, Arc<PeerSignals>)>;

pub struct Outbox {
    store: Store,
    clock: Clock,
    /// A std mutex: held for one map lookup or insert, never across an await.
    peers: Mutex<HashMap<ServerName, Arc<PeerSignals>>>,
    new_peers: mpsc::UnboundedSender<(ServerName, Arc<PeerSignals>)>,
}

impl Outbox {
    pub fn new(store: Store, clock: Clock) -> (Outbox, NewPeers) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = Outbox {
            store,
            clock,
            peers: Mutex::default(),
            new_peers: tx,
        };
        (outbox, rx)
    }

    fn signals(&self, peer: &ServerName) -> Arc<PeerSignals> {
        let mut map = self.peers.lock().expect("outbox map lock");
        if let Some(s) = map.get(peer) {
            return s.clone();
        }
        let s = Arc::new(PeerSignals {
            queued: Notify::new(),
            inbound: Notify::new(),
            next_retry_at_ms: AtomicI64::new(0),
            edus: Mutex::new(BTreeMap::new()),
        });
        map.insert(peer.clone(), s.clone());
        // No receiver means the worker is not running (a command-line
        // tool, or shutdown): the rows wait for the next start.
        let _ = self.new_peers.send((peer.clone(), s.clone()));
        s
    }

    /// New rows are queued for `peer`.
    pub fn wake(&self, peer: &ServerName) {
        self.signals(peer).queued.notify_one();
    }

    /// Queue a presence EDU for `peer`, replacing an older one of the same sender.
    pub fn queue_edu(&self, peer: &ServerName, sender: &str, edu: serde_json::Value) {
        let s = self.signals(peer);
        s.edus
            .lock()
            .expect("edu lock")
            .insert(sender.to_string(), (self.clock.now_ms(), edu));
        s.queued.notify_one();
    }

    /// When `peer`'s task will try again, if it is backing off.
    pub fn next_retry_at_ms(&self, peer: &ServerName) -> Option<i64> {
        let map = self.peers.lock().expect("outbox map lock");
        map.get(peer)
            .map(|s| s.next_retry_at_ms.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
    }

    /// `peer` just talked to us: cut its backoff short.
    pub fn peer_is_back(&self, peer: &ServerName) {
        let known = self
            .peers
            .lock()
            .expect("outbox map lock")
            .get(peer)
            .cloned();
        if let Some(s) = known {
            s.inbound.notify_one();
        } else if self.store.outbox_depth(peer) > 0 {
            self.wake(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::WriteSet;

    fn peer(n: &str) -> ServerName {
        ServerName::parse(n).unwrap()
    }

    #[tokio::test]
    async fn a_peer_reaches_the_worker_once_however_often_it_is_rung() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (outbox, mut new_peers) = Outbox::new(store, Clock::starting_at(0));
        let b = peer("b.test:8448");
        outbox.wake(&b);
        outbox.wake(&b);
        outbox.queue_edu(&b, "@x:a.test", serde_json::json!({}));
        let (first, _) = new_peers.try_recv().expect("the first ring");
        assert_eq!(first, b);
        assert!(new_peers.try_recv().is_err(), "later rings only notify");
        outbox.wake(&peer("c.test"));
        assert_eq!(new_peers.try_recv().unwrap().0, peer("c.test"));
    }

    #[tokio::test]
    async fn a_peer_heard_from_is_started_only_when_rows_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (outbox, mut new_peers) = Outbox::new(store.clone(), Clock::starting_at(0));
        let b = peer("b.test");
        // Anyone can make a peer "talk to us": with nothing queued for it,
        // no entry and no task.
        outbox.peer_is_back(&b);
        assert!(new_peers.try_recv().is_err());
        assert!(outbox.peers.lock().unwrap().is_empty());
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let event = crate::protocol::event::Event::create(
            crate::ids::RoomId::parse("!RoomHostedOnPeer0000:b.test").unwrap(),
            crate::ids::Fqid::parse("@alice:a.test").unwrap(),
            0,
            crate::protocol::event::Content::Message {
                body: "hi".into(),
                thread_root: None,
                reply_to: None,
                mentions: vec![],
            },
            &crate::ids::KeyId::derive(key.verifying_key().as_bytes()),
            &key,
        );
        let mut w = WriteSet::default();
        store.queue_event(&mut w, &b, &event, vec![], 0).unwrap();
        store.commit(&w).unwrap();
        outbox.peer_is_back(&b);
        assert_eq!(new_peers.try_recv().unwrap().0, b);
    }
}
