//! Peers that discovery reports (mDNS, the gateway's registry): dialled while discovery knows
//! them, closed when it says they left. Which node dials first, and when to forget, is decided by
//! `mesh_core::discovery::Directory`; this is the shell that carries it out.

use std::time::Duration;

use mesh_core::discovery::{Action, Update};
use mesh_core::{Backoff, NodeName};
use tracing::{debug, warn};

use super::{CLOSE_BAD_HELLO, CLOSE_GONE, Transport};
use crate::clock::now;
use crate::identity::peer_id;

impl Transport {
    /// Acts on one discovery update.
    pub(crate) fn handle_discovery(&self, update: Update) {
        let actions = self
            .inner
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle_update(update);
        for action in actions {
            match action {
                Action::Dial(name) => {
                    let fresh = self
                        .inner
                        .dialing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone());
                    if fresh {
                        tokio::spawn(self.clone().dial_discovered(name));
                    }
                }
                Action::Forget(name) => {
                    for conn in self.inner.peers.connections_of(&name) {
                        conn.close(CLOSE_GONE.into(), b"left the mesh");
                    }
                }
            }
        }
    }

    /// Keeps a discovered peer connected for as long as discovery knows it.
    async fn dial_discovered(self, name: NodeName) {
        let mut stop = self.inner.shutdown.clone();
        let mut changed = self.inner.peers.subscribe();
        let first = self
            .inner
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_dial_at(&name, now());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep_until(first.into()) => {}
            _ = stop.changed() => return,
        }
        loop {
            let record = self
                .inner
                .directory
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned();
            let Some(record) = record else { break };
            if self.inner.peers.connected_to(&name) {
                // The peer dialled us, or a connection is up: wait until that changes.
                tokio::select! {
                    r = changed.changed() => if r.is_err() { break },
                    _ = stop.changed() => break,
                }
                continue;
            }
            let mut last = String::from("no address");
            for addr in &record.addrs {
                let place = self.dial_place().await;
                // The wait for a place may have been long: the peer may have dialled this node
                // since (only one of the two is meant to dial).
                if self.inner.peers.connected_to(&name) {
                    last.clear();
                    break;
                }
                match self.connect_in(*addr, place).await {
                    Ok(conn) => {
                        match peer_id(&conn) {
                            Ok(id) if id.node_name() == &name => {
                                if self.run_connection(conn).await == super::Served::Yes {
                                    backoff.reset();
                                }
                                last.clear();
                            }
                            Ok(id) => {
                                warn!(
                                    "discovery names {name} at {addr}, but the certificate there proves {id}: ignoring that record"
                                );
                                conn.close(CLOSE_BAD_HELLO.into(), b"not the announced node");
                                self.stop_dialing(&name);
                                return;
                            }
                            Err(e) => last = e.to_string(),
                        }
                        break;
                    }
                    Err(why) => last = format!("{addr}: {why}"),
                }
            }
            if !last.is_empty() {
                debug!("cannot reach discovered peer {name}: {last}");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay(crate::rng::random())) => {}
                _ = stop.changed() => break,
            }
        }
        self.stop_dialing(&name);
    }

    fn stop_dialing(&self, name: &NodeName) {
        self.inner
            .dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}
