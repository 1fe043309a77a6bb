//! Builtins: upstreams that answer from inside the node. `builtin:echo` answers with the request
//! body (and echoes a streamed body chunk by chunk); `builtin:health` answers
//! `{"status":"ok","node":"<node name>"}`.

use bytes::Bytes;

use crate::call::Reply;

/// A builtin upstream.
pub(crate) enum Builtin {
    Echo,
    Health(Bytes),
}

impl Builtin {
    pub(crate) fn health(node: &str) -> Self {
        Builtin::Health(Bytes::from(format!(
            "{{\"status\":\"ok\",\"node\":{}}}",
            crate::http::json_str(node)
        )))
    }

    pub(crate) fn serve(&self, body: Bytes) -> Reply {
        match self {
            Builtin::Echo => Reply::ok(body),
            Builtin::Health(answer) => Reply::ok(answer.clone()),
        }
    }
}
