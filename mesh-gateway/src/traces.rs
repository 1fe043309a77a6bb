//! Recent traces: the spans nodes sampled, grouped by trace, in a store bounded by trace count
//! (the oldest trace goes first). Served as JSON on `GET /v1/traces`.

use std::collections::{HashMap, VecDeque};

use mesh_proto::control::Span;

/// Spans per trace kept at most.
const MAX_SPANS_PER_TRACE: usize = 256;

/// The bounded trace store.
#[derive(Debug)]
pub struct Traces {
    order: VecDeque<[u8; 16]>,
    spans: HashMap<[u8; 16], Vec<Span>>,
    max_traces: usize,
}

impl Traces {
    /// A store of at most `max_traces` traces.
    pub fn new(max_traces: usize) -> Self {
        Traces {
            order: VecDeque::new(),
            spans: HashMap::new(),
            max_traces: max_traces.max(1),
        }
    }

    /// Adds a span to its trace.
    pub fn add(&mut self, span: Span) {
        let id = span.trace_id;
        if !self.spans.contains_key(&id) {
            if self.order.len() == self.max_traces
                && let Some(old) = self.order.pop_front()
            {
                self.spans.remove(&old);
            }
            self.order.push_back(id);
        }
        let list = self.spans.entry(id).or_default();
        if list.len() < MAX_SPANS_PER_TRACE {
            list.push(span);
        }
    }

    /// How many traces are held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The newest `limit` traces as JSON, newest first.
    pub fn json(&self, limit: usize) -> serde_json::Value {
        let traces: Vec<serde_json::Value> = self
            .order
            .iter()
            .rev()
            .take(limit)
            .filter_map(|id| {
                let spans = self.spans.get(id)?;
                Some(serde_json::json!({
                    "trace_id": hex(id),
                    "spans": spans.iter().map(|s| serde_json::json!({
                        "span_id": hex(&s.span_id),
                        "parent_span_id": s.parent_span_id.as_ref().map(|p| hex(p)),
                        "kind": if s.client { "client" } else { "server" },
                        "node": s.node,
                        "service": s.service,
                        "method": s.method,
                        "start_unix_us": s.start_unix_us,
                        "duration_us": s.duration_us,
                        "status": s.status.as_str(),
                    })).collect::<Vec<_>>(),
                }))
            })
            .collect();
        serde_json::json!({ "traces": traces })
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::Status;

    fn span(trace: u8, client: bool) -> Span {
        Span {
            trace_id: [trace; 16],
            span_id: [client as u8; 8],
            parent_span_id: None,
            client,
            node: "a".into(),
            service: "s".into(),
            method: "m".into(),
            start_unix_us: 1,
            duration_us: 2,
            status: Status::Ok,
        }
    }

    #[test]
    fn groups_by_trace_and_forgets_the_oldest() {
        let mut t = Traces::new(2);
        t.add(span(1, true));
        t.add(span(1, false));
        t.add(span(2, true));
        t.add(span(3, true));
        assert_eq!(t.len(), 2);
        let json = t.json(10);
        let ids: Vec<&str> = json["traces"]
            .as_array()
            .expect("array")
            .iter()
            .map(|t| t["trace_id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, [hex(&[3; 16]), hex(&[2; 16])]);
    }
}
