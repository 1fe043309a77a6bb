//! Which message from the cloud a topic names: the one decision the bridge makes from a topic
//! and a response topic, both anyone who may publish on the broker chooses. Pure, so it is
//! tested and fuzzed on its own (`fuzz/`, target `cloud_topic`).

/// What a message from the cloud asks, by its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `<prefix>/policy/set`: a signed policy bundle.
    Policy,
    /// `<prefix>/call/<service>/<method>[/<id>]`: a call into the mesh, answered as `reply`
    /// says. The service and method are not checked as names here; the call checks them.
    Call {
        /// The service named.
        service: &'a str,
        /// The method named.
        method: &'a str,
        /// Where the answer goes.
        reply: Reply,
    },
}

/// Where a call's answer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The MQTT 5 response topic (under `<prefix>/reply/`, without wildcards).
    Topic(String),
    /// `<prefix>/reply/<id>/<status>`.
    Id(String),
}

/// Routes a message on `topic` with MQTT 5 response topic `response_topic`, for a site
/// publishing under `prefix`; or says why the gateway refuses it.
pub fn route<'a>(
    prefix: &str,
    topic: &'a str,
    response_topic: Option<&str>,
) -> Result<Route<'a>, String> {
    let rest = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or("");
    if rest == "policy/set" {
        return Ok(Route::Policy);
    }
    // `call/<service>/<method>` answered on the MQTT 5 response topic, or
    // `call/<service>/<method>/<id>` answered on `reply/<id>/<status>` (any MQTT version).
    let parts: Vec<&str> = rest.split('/').collect();
    let (service, method, id) = match parts.as_slice() {
        ["call", s, m] => (*s, *m, None),
        ["call", s, m, id] => (*s, *m, Some(*id)),
        _ => ("", "", None),
    };
    if service.is_empty() || method.is_empty() || id.is_some_and(str::is_empty) {
        return Err("not a topic the gateway takes messages on".into());
    }
    if let Some(id) = id
        && id.contains(['+', '#'])
    {
        return Err(format!(
            "call id {id:?}: the answer's topic would hold a wildcard"
        ));
    }
    // The site publishes under its prefix only (the broker's ACL says so too, and a broker may
    // end the session of a client that publishes elsewhere).
    let reply = match (response_topic, id) {
        (Some(t), _) if !t.starts_with(&format!("{prefix}/reply/")) || t.contains(['+', '#']) => {
            return Err(format!(
                "response topic {t:?}: answers go under {prefix}/reply/ (where the site may \
                 publish, and not on its own topics), without wildcards"
            ));
        }
        (Some(t), _) => Reply::Topic(t.to_owned()),
        (None, Some(id)) => Reply::Id(id.to_owned()),
        (None, None) => {
            return Err(
                "a call needs an MQTT 5 response topic or an id to answer on \
                        (call/<service>/<method>/<id>)"
                    .into(),
            );
        }
    };
    Ok(Route::Call {
        service,
        method,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "starling/site-7";

    #[test]
    fn topics_route_or_say_why_not() {
        assert_eq!(
            route(P, "starling/site-7/policy/set", None),
            Ok(Route::Policy)
        );
        assert_eq!(
            route(P, "starling/site-7/call/echo/say/42", None),
            Ok(Route::Call {
                service: "echo",
                method: "say",
                reply: Reply::Id("42".into())
            })
        );
        assert_eq!(
            route(
                P,
                "starling/site-7/call/echo/say",
                Some("starling/site-7/reply/app")
            ),
            Ok(Route::Call {
                service: "echo",
                method: "say",
                reply: Reply::Topic("starling/site-7/reply/app".into())
            })
        );
        for (topic, response, why) in [
            ("starling/site-7/call/echo", None, "not a topic"),
            ("starling/site-7/call//say/1", None, "not a topic"),
            ("starling/site-7/call/echo/say/", None, "not a topic"),
            ("starling/site-7/call/echo/say/a/b", None, "not a topic"),
            ("other/call/echo/say/1", None, "not a topic"),
            ("starling/site-7/call/echo/say/+", None, "wildcard"),
            (
                "starling/site-7/call/echo/say",
                None,
                "response topic or an id",
            ),
            (
                "starling/site-7/call/echo/say",
                Some("starling/site-7/telemetry"),
                "answers go under",
            ),
            (
                "starling/site-7/call/echo/say",
                Some("starling/site-7/reply/#"),
                "without wildcards",
            ),
        ] {
            let e = route(P, topic, response).expect_err(topic);
            assert!(e.contains(why), "{topic}: {e}");
        }
    }
}
