//! What discovery says about peers, and what the node does about it.
//!
//! Any discovery source (mDNS, a static list, an in-memory bus in tests) yields a stream of
//! [`Update`]s. The [`Directory`] folds them into the set of peers known to exist and answers, for
//! each, whether this node should dial it now. A record proves nothing about who a peer is: the
//! node only trusts the identity its mutual-TLS handshake proves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::name::NodeName;

/// A peer as discovery describes it: a claim, not an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The instance name it announces.
    pub name: NodeName,
    /// Where it says it listens.
    pub addrs: Vec<SocketAddr>,
    /// `node` or `gateway`.
    pub role: String,
    /// Its announced labels.
    pub labels: BTreeMap<String, String>,
    /// A short digest of its hosted services; changes when they do.
    pub services_digest: String,
}

/// One change reported by a discovery source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// These are all the peers there are (a source that restarted).
    Reset(Vec<Record>),
    /// A peer appeared or changed.
    Add(Record),
    /// A peer said goodbye or its record expired.
    Remove(NodeName),
}

/// What the node should do after an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start dialling this peer (if no dial loop runs for it yet).
    Dial(NodeName),
    /// The peer left: stop dialling it and close its connections.
    Forget(NodeName),
}

/// The peers discovery knows of.
#[derive(Debug, Clone)]
pub struct Directory {
    me: NodeName,
    known: BTreeMap<NodeName, Record>,
}

/// How long the node with the greater name waits before dialling a newly found peer, so that
/// usually only one side dials and each pair shares one connection.
pub const DIAL_GRACE: Duration = Duration::from_millis(500);

impl Directory {
    /// An empty directory for node `me` (which never dials itself).
    pub fn new(me: NodeName) -> Self {
        Directory {
            me,
            known: BTreeMap::new(),
        }
    }

    /// Applies an update; returns what to do.
    pub fn handle_update(&mut self, update: Update) -> Vec<Action> {
        match update {
            Update::Add(record) => {
                if record.name == self.me {
                    return Vec::new();
                }
                let name = record.name.clone();
                let new = self.known.insert(name.clone(), record).is_none();
                if new {
                    vec![Action::Dial(name)]
                } else {
                    Vec::new()
                }
            }
            Update::Remove(name) => match self.known.remove(&name) {
                Some(_) => vec![Action::Forget(name)],
                None => Vec::new(),
            },
            Update::Reset(records) => {
                let gone: Vec<NodeName> = self
                    .known
                    .keys()
                    .filter(|k| !records.iter().any(|r| &r.name == *k))
                    .cloned()
                    .collect();
                let mut actions = Vec::new();
                for name in gone {
                    self.known.remove(&name);
                    actions.push(Action::Forget(name));
                }
                for r in records {
                    actions.extend(self.handle_update(Update::Add(r)));
                }
                actions
            }
        }
    }

    /// The record of `name`, if discovery knows it.
    pub fn get(&self, name: &NodeName) -> Option<&Record> {
        self.known.get(name)
    }

    /// Every peer discovery knows.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.known.values()
    }

    /// When this node may first dial `peer`, found at `found`: at once if this node's name sorts
    /// first, after [`DIAL_GRACE`] otherwise (unless `peer` connected to us meanwhile).
    pub fn first_dial_at(&self, peer: &NodeName, found: Instant) -> Instant {
        if self.me < *peer {
            found
        } else {
            found + DIAL_GRACE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::try_from(s).expect("name")
    }

    fn rec(name: &str) -> Record {
        Record {
            name: n(name),
            addrs: vec!["198.18.0.2:7400".parse().expect("addr")],
            role: "node".into(),
            labels: BTreeMap::new(),
            services_digest: String::new(),
        }
    }

    #[test]
    fn add_dials_once_and_never_self() {
        let mut d = Directory::new(n("b"));
        assert_eq!(
            d.handle_update(Update::Add(rec("a"))),
            vec![Action::Dial(n("a"))]
        );
        assert_eq!(d.handle_update(Update::Add(rec("a"))), vec![]);
        assert_eq!(d.handle_update(Update::Add(rec("b"))), vec![]);
        assert_eq!(d.records().count(), 1);
    }

    #[test]
    fn remove_forgets_known_peers_only() {
        let mut d = Directory::new(n("b"));
        d.handle_update(Update::Add(rec("a")));
        assert_eq!(
            d.handle_update(Update::Remove(n("a"))),
            vec![Action::Forget(n("a"))]
        );
        assert_eq!(d.handle_update(Update::Remove(n("a"))), vec![]);
        assert!(d.get(&n("a")).is_none());
    }

    #[test]
    fn reset_forgets_the_missing_and_dials_the_new() {
        let mut d = Directory::new(n("m"));
        d.handle_update(Update::Add(rec("a")));
        d.handle_update(Update::Add(rec("b")));
        let actions = d.handle_update(Update::Reset(vec![rec("b"), rec("c")]));
        assert_eq!(actions, vec![Action::Forget(n("a")), Action::Dial(n("c"))]);
        assert_eq!(
            d.records().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
    }

    #[test]
    fn the_smaller_name_dials_first() {
        let d = Directory::new(n("b"));
        let t = Instant::now();
        assert_eq!(d.first_dial_at(&n("c"), t), t);
        assert_eq!(d.first_dial_at(&n("a"), t), t + DIAL_GRACE);
    }
}
