//! The caller's side of a call: route -> pick -> call -> retry or mirror, each a decision of
//! `mesh-core` carried out here.
//!
//! Per call: the route match and weighted split (canary, rollout, geography); an endpoint picked by
//! power of two choices over peak-EWMA, in the caller's zone first, skipping ejected and full
//! endpoints; the deadline; retries for idempotent methods on retryable statuses within the retry
//! budget, with back-off, on another endpoint when there is one; the circuit breaker fed with every
//! outcome; a mirrored copy of a share of calls, whose answer is dropped. The client owns the
//! balancers and retry budgets; every decision is counted per rule in the node's telemetry.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::authz::glob;
use mesh_core::balance::{BalanceConfig, Balancer, Outcome};
use mesh_core::limits::RetryBudget;
use mesh_core::route::{self, Subset};
use mesh_core::{MethodName, NodeName, ServiceName, SpiffeId};
use mesh_proto::control::Span;
use mesh_proto::heads::ResponseView;
use mesh_proto::limits::MAX_HEAD_BYTES;
use mesh_proto::{
    KEEP_METADATA, KEPT_IDLE_CODE, RequestHead, STREAM_METADATA, Status, TUNNEL_METADATA,
    TUNNEL_METHOD, TraceContext,
};
use tracing::{debug, warn};

use crate::call::{CallContext, CallError, CallOptions, CallStream, Reply};
use crate::clock::{now, since};
use crate::config::Limits;
use crate::control::telemetry::{TelemetrySink, unix_us};
use crate::hosted::Hosted;
use crate::kept::KeptStreams;
use crate::peers::{PeerSet, Picked};
use crate::policy::{Policy, PolicyCell};
use crate::rng::random;
use crate::server::Server;
use crate::wire::{FrameReader, Framed, ReadError, write_encoded, write_head};

/// The caller side of every call this node makes.
pub(crate) struct Client {
    pub(crate) id: SpiffeId,
    /// `id` as text, made once.
    pub(crate) id_text: String,
    pub(crate) name: NodeName,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) limits: Limits,
    pub(crate) trace_sample: f64,
    pub(crate) peers: Arc<PeerSet>,
    pub(crate) policy: Arc<PolicyCell>,
    pub(crate) telemetry: Arc<TelemetrySink>,
    pub(crate) hosted: Arc<Hosted>,
    pub(crate) server: Arc<Server>,
    state: Arc<Mutex<ClientState>>,
}

/// Per-service balancer state and retry budgets.
#[derive(Default)]
struct ClientState {
    balancers: mesh_core::FastMap<String, Balancer<u64>>,
    budgets: HashMap<String, RetryBudget>,
}

/// What a call is sent with, fixed before the first attempt.
struct Plan<'a> {
    service: &'a str,
    method: &'a str,
    options: &'a CallOptions,
    trace: TraceContext,
    deadline: Instant,
    /// The route's name (or the service's): what rule counters are kept under.
    rule: &'a str,
    balance: &'a BalanceConfig,
    /// The cloud identity the call is made for (a gateway's call from its cloud bridge).
    on_behalf_of: Option<&'a str>,
}

impl Client {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: SpiffeId,
        labels: BTreeMap<String, String>,
        limits: Limits,
        trace_sample: f64,
        peers: Arc<PeerSet>,
        policy: Arc<PolicyCell>,
        telemetry: Arc<TelemetrySink>,
        hosted: Arc<Hosted>,
        server: Arc<Server>,
    ) -> Self {
        Client {
            id_text: id.to_string(),
            name: id.node_name().clone(),
            id,
            labels,
            limits,
            trace_sample,
            peers,
            policy,
            telemetry,
            hosted,
            server,
            state: Arc::new(Mutex::new(ClientState::default())),
        }
    }

    fn state(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a call and counts it (and its span, when sampled) in the node's telemetry.
    pub(crate) async fn call(
        &self,
        service: &str,
        method: &str,
        body: Bytes,
        options: &CallOptions,
    ) -> Reply {
        let started = now();
        let trace = self.trace_for(options);
        // The wall clock is read only for a span that will be recorded.
        let started_wall = if trace.flags & 1 == 1 { unix_us() } else { 0 };
        let (reply, callee, ended) = self
            .call_inner(service, method, body, options, trace, started)
            .await;
        // The end the last attempt read, when it went to a peer (a clock read spared).
        let latency = ended.map_or_else(
            || since(started),
            |ended| ended.saturating_duration_since(started),
        );
        // Served by a microcontroller behind the callee: counted under its leaf name.
        let callee: std::borrow::Cow<'_, str> = match (&callee, &reply.leaf) {
            (Some(callee), Some(leaf)) => format!("{callee}/leaf/{leaf}").into(),
            (Some(callee), None) => callee.as_str().into(),
            (None, _) => "".into(),
        };
        // Names that are not names (refused as such) are counted under one series. A call that
        // succeeded had its names checked already.
        let valid = reply.status == Status::Ok
            || mesh_proto::validate_name(service)
                .and(mesh_proto::validate_name(method))
                .is_ok();
        let (service, method) = if valid {
            (service, method)
        } else {
            ("_invalid", mesh_core::telemetry::OTHER_METHOD)
        };
        self.telemetry.record_call(
            service,
            method,
            self.name.as_str(),
            &callee,
            reply.status,
            latency,
        );
        if trace.flags & 1 == 1 {
            self.telemetry.record_span(Span {
                trace_id: trace.trace_id,
                span_id: trace.span_id,
                parent_span_id: options.trace.map(|p| p.span_id),
                client: true,
                node: self.name.as_str().to_owned(),
                service: service.to_owned(),
                method: method.to_owned(),
                start_unix_us: started_wall,
                duration_us: latency.as_micros() as u64,
                status: reply.status,
            });
        }
        reply
    }

    fn trace_for(&self, options: &CallOptions) -> TraceContext {
        match options.trace {
            Some(parent) => TraceContext {
                trace_id: parent.trace_id,
                span_id: random().to_le_bytes(),
                flags: parent.flags,
            },
            None => TraceContext {
                trace_id: crate::rng::trace_id(),
                span_id: random().to_le_bytes(),
                flags: u8::from((random() % 1_000_000) as f64 / 1e6 < self.trace_sample),
            },
        }
    }

    /// The call itself; returns the reply, the name of the node that served it (none when no node
    /// did), and when its last attempt ended, if it went to a peer.
    async fn call_inner(
        &self,
        service: &str,
        method: &str,
        body: Bytes,
        options: &CallOptions,
        trace: TraceContext,
        started: Instant,
    ) -> (Reply, Option<NodeName>, Option<Instant>) {
        let policy = self.policy.policy();
        let timeout = options
            .timeout
            .or_else(|| policy.as_ref().and_then(|p| p.timeout_for(service)))
            .unwrap_or(self.limits.call_timeout);
        let deadline = started + timeout;
        if let Err(reply) = check_request(&self.id, service, method, options) {
            return (reply, None, None);
        }
        if body.len() > self.limits.max_body_bytes {
            let reply = Reply::error(
                Status::InvalidArgument,
                format!(
                    "request body of {} bytes exceeds the bound of {} bytes",
                    body.len(),
                    self.limits.max_body_bytes
                ),
            );
            return (reply, None, None);
        }
        // Hosted here; or hosted here while a device offers it, and no peer hosts it now (then
        // the server says it is away).
        if self.hosted.contains(service)
            || (self.hosted.is_intermittent(service) && !self.peers.has_endpoint(service))
        {
            let (Ok(service), Ok(method)) =
                (ServiceName::try_from(service), MethodName::try_from(method))
            else {
                let reply = Reply::error(Status::InvalidArgument, "bad service or method name");
                return (reply, None, None);
            };
            let ctx = CallContext {
                // The server asks the policy, for an upstream that needs to know.
                idempotent: false,
                caller: options
                    .on_behalf_of
                    .clone()
                    .unwrap_or_else(|| self.id.clone()),
                service,
                method,
                metadata: options.metadata.clone(),
                deadline,
                trace: Some(trace),
                streaming: false,
            };
            // Boxed: rare, and its future (any upstream's) would make every remote call's larger.
            let reply = Box::pin(self.server.serve_local(ctx, body, &self.labels)).await;
            return (reply, Some(self.name.clone()), None);
        }
        self.call_remote(
            service, method, body, options, trace, deadline, policy, started,
        )
        .await
    }

    /// A call to a service hosted elsewhere, under `policy` (read once per call), made at
    /// `call_started`; returns what [`Client::call_inner`] does.
    #[allow(clippy::too_many_arguments)]
    async fn call_remote(
        &self,
        service: &str,
        method: &str,
        body: Bytes,
        options: &CallOptions,
        trace: TraceContext,
        deadline: Instant,
        policy: Option<Arc<Policy>>,
        call_started: Instant,
    ) -> (Reply, Option<NodeName>, Option<Instant>) {
        let svc = policy.as_ref().and_then(|p| p.service(service));
        let decision = self.route(svc, method, options);
        let deadline = match (options.timeout, decision.route.and_then(|r| r.timeout)) {
            (None, Some(t)) => now() + t,
            _ => deadline,
        };
        let default_balance = BalanceConfig::default();
        let on_behalf_of = options.on_behalf_of.as_ref().map(SpiffeId::to_string);
        let plan = Plan {
            service,
            method,
            options,
            trace,
            deadline,
            rule: decision.route.map_or(service, |r| r.name.as_str()),
            balance: svc.map_or(&default_balance, |s| &s.balance),
            on_behalf_of: on_behalf_of.as_deref(),
        };
        let idempotent = svc.is_some_and(|s| s.idempotent.iter().any(|g| glob(g, method)));
        let retry = svc.and_then(|s| s.retry.as_ref()).filter(|_| idempotent);
        if let Some(r) = retry {
            self.state()
                .budgets
                .entry(service.to_owned())
                .or_insert_with(|| RetryBudget::new(r.budget, 10.0))
                .deposit();
        }
        if let Some(mirror) = decision.mirror {
            self.mirror(&plan, &body, mirror.clone());
        }

        let mut tried: Vec<u64> = Vec::new();
        let mut attempt = 1;
        loop {
            // The first attempt starts with the call (a clock read spared).
            let started = if attempt == 1 { call_started } else { now() };
            let picked = match self.pick(&plan, &decision.subset, &tried, started) {
                Ok(found) => found,
                Err(reply) => return (reply, None, None),
            };
            let left = deadline.saturating_duration_since(started);
            let (reply, ended) = match self.encoded_head(&plan, left, picked.protocol >= 4, &body) {
                Err(reply) => (reply, now()),
                Ok((framed, keep)) => {
                    let kept = keep.then(|| self.keep_on(&picked.kept));
                    let max_body = self.limits.max_body_bytes;
                    let call = send_call(picked.conn, kept, framed, max_body, started);
                    // At the deadline, not after `left` (a clock read spared).
                    match crate::clock::bounded(|| deadline.into(), call).await {
                        Some(answered) => answered,
                        None => (
                            Reply::error(
                                Status::DeadlineExceeded,
                                format!("no answer from {service} within the deadline"),
                            ),
                            now(),
                        ),
                    }
                }
            };
            self.finish(
                &plan,
                picked.key,
                picked.callee.as_str(),
                (started, ended),
                reply.status,
            );
            let callee = Some(picked.callee);
            let Some(r) = retry else {
                return (reply, callee, Some(ended));
            };
            if !reply.status.is_retryable() || attempt >= r.attempts {
                return (reply, callee, Some(ended));
            }
            let backoff = r.backoff.saturating_mul(1 << (attempt - 1).min(10));
            if now() + backoff >= deadline {
                return (reply, callee, Some(ended));
            }
            let allowed = self
                .state()
                .budgets
                .get_mut(service)
                .is_some_and(RetryBudget::withdraw);
            if !allowed {
                debug!("retry budget of {service} spent; not retrying");
                return (reply, callee, Some(ended));
            }
            self.telemetry.record_rule(plan.rule, "retried");
            tried.push(picked.key);
            attempt += 1;
            tokio::time::sleep(backoff).await;
        }
    }

    /// Opens a streamed call: routed, balanced and authorized like any other, never retried or
    /// mirrored (its body is not kept). The callee must speak protocol 2.
    pub(crate) async fn call_stream(
        &self,
        service: &str,
        method: &str,
        options: &CallOptions,
    ) -> Result<CallStream, CallError> {
        check_request(&self.id, service, method, options).map_err(Reply::into_error)?;
        if self.hosted.contains(service) {
            return Err(CallError::new(
                Status::InvalidArgument,
                format!(
                    "service {service} is hosted on this node ({}): streamed calls cross the \
                     mesh; call it with the body whole",
                    self.name
                ),
            ));
        }
        let policy = self.policy.policy();
        let svc = policy.as_ref().and_then(|p| p.service(service));
        // A timeout the caller set bounds the whole call; otherwise each step of it (see
        // `CallStream`), and the callee hears of no deadline (0).
        let step = policy
            .as_ref()
            .and_then(|p| p.timeout_for(service))
            .unwrap_or(self.limits.call_timeout);
        let time = crate::call::StreamTime {
            deadline: options.timeout.map(|t| (now() + t).into()),
            step,
        };
        let timeout = options.timeout.unwrap_or(step);
        let decision = self.route(svc, method, options);
        let default_balance = BalanceConfig::default();
        let on_behalf_of = options.on_behalf_of.as_ref().map(SpiffeId::to_string);
        let plan = Plan {
            service,
            method,
            options,
            trace: self.trace_for(options),
            deadline: now() + timeout,
            rule: decision.route.map_or(service, |r| r.name.as_str()),
            balance: svc.map_or(&default_balance, |s| &s.balance),
            on_behalf_of: on_behalf_of.as_deref(),
        };
        let started = now();
        let picked = match self.pick(&plan, &decision.subset, &[], started) {
            Ok(p) => p,
            Err(reply) => {
                self.record_stream(&plan, "", reply.status, started);
                return Err(reply.into_error());
            }
        };
        // Until the answer's head hands the call to the hook, a failure is counted here.
        let failed = |e: CallError| {
            self.finish(
                &plan,
                picked.key,
                picked.callee.as_str(),
                (started, now()),
                e.status,
            );
            self.record_stream(&plan, picked.callee.as_str(), e.status, started);
            e
        };
        if picked.protocol < 2 {
            return Err(failed(CallError::new(
                Status::Unavailable,
                format!(
                    "{} speaks protocol {}, which has no streamed calls",
                    picked.callee, picked.protocol
                ),
            )));
        }
        let mut head = self
            .head(&plan, timeout)
            .map_err(|r| failed(r.into_error()))?;
        if options.timeout.is_none() {
            head.deadline_ms = 0;
        }
        head.metadata
            .push((STREAM_METADATA, "1"))
            .map_err(|_| failed(too_much_metadata().into_error()))?;
        let lost = |e: &dyn std::fmt::Display| {
            CallError::new(Status::Unavailable, format!("connection to peer lost: {e}"))
        };
        let (mut send, recv) = picked
            .kept
            .open_unkept(&picked.conn)
            .await
            .map_err(|e| failed(lost(&e)))?;
        write_head(&mut send, &head)
            .await
            .map_err(|e| failed(lost(&e)))?;
        // The call is counted, and its endpoint's breaker and latency fed, when the answer's head
        // arrives; a stream dropped before that gives its slot back.
        let hook = {
            let (telemetry, state) = (self.telemetry.clone(), self.state.clone());
            let (service, method, caller) = (
                service.to_owned(),
                method.to_owned(),
                self.name.as_str().to_owned(),
            );
            let (callee, key) = (picked.callee.clone(), picked.key);
            Box::new(move |status: Option<Status>| {
                let latency = since(started);
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                let balancer = state.balancers.get_mut(&service);
                let Some(status) = status else {
                    if let Some(b) = balancer {
                        b.cancel(&key);
                    }
                    return;
                };
                if let Some(b) = balancer {
                    b.finish(&key, latency, !status.is_failure(), now());
                }
                drop(state);
                telemetry.record_call(&service, &method, &caller, callee.as_str(), status, latency);
            }) as crate::call::HeadHook
        };
        Ok(CallStream::new(
            send,
            recv,
            time,
            self.limits.max_stream_bytes,
            Some(hook),
        ))
    }

    /// Counts a streamed call that failed before its answer's head.
    fn record_stream(&self, plan: &Plan<'_>, callee: &str, status: Status, started: Instant) {
        self.telemetry.record_call(
            plan.service,
            plan.method,
            self.name.as_str(),
            callee,
            status,
            since(started),
        );
    }

    /// Opens a TCP tunnel to an endpoint of `service` (method `connect`), picked like a call's
    /// (route, zone, balancer, breaker). An endpoint that cannot open it (its upstream refuses,
    /// it is unreachable, it speaks an older protocol) is counted against its breaker and the next
    /// one is tried, up to three; a refusal by policy is final. The opening is counted as a call
    /// of method `connect`.
    pub(crate) async fn open_tunnel(&self, service: &str) -> Result<OpenTunnel, Reply> {
        let started = now();
        let (result, callee) = self.open_tunnel_inner(service).await;
        let status = result.as_ref().map_or_else(|r| r.status, |_| Status::Ok);
        let service = if mesh_proto::validate_name(service).is_ok() {
            service
        } else {
            "_invalid"
        };
        self.telemetry.record_call(
            service,
            TUNNEL_METHOD,
            self.name.as_str(),
            callee.as_ref().map_or("", NodeName::as_str),
            status,
            since(started),
        );
        result
    }

    async fn open_tunnel_inner(
        &self,
        service: &str,
    ) -> (Result<OpenTunnel, Reply>, Option<NodeName>) {
        let options = CallOptions::default();
        if let Err(reply) = check_request(&self.id, service, TUNNEL_METHOD, &options) {
            return (Err(reply), None);
        }
        if self.hosted.contains(service) {
            let reply = Reply::error(
                Status::InvalidArgument,
                format!(
                    "service {service} is hosted on this node ({}): connect to its upstream directly",
                    self.name
                ),
            );
            return (Err(reply), None);
        }
        let policy = self.policy.policy();
        let svc = policy.as_ref().and_then(|p| p.service(service));
        let timeout = policy
            .as_ref()
            .and_then(|p| p.timeout_for(service))
            .unwrap_or(self.limits.call_timeout);
        let decision = self.route(svc, TUNNEL_METHOD, &options);
        let default_balance = BalanceConfig::default();
        let plan = Plan {
            service,
            method: TUNNEL_METHOD,
            options: &options,
            trace: self.trace_for(&options),
            deadline: now() + timeout,
            rule: decision.route.map_or(service, |r| r.name.as_str()),
            balance: svc.map_or(&default_balance, |s| &s.balance),
            on_behalf_of: None,
        };
        let mut tried: Vec<u64> = Vec::new();
        let mut last = (Reply::error(Status::Unavailable, "no endpoint"), None);
        for _ in 0..3 {
            let picked = match self.pick(&plan, &decision.subset, &tried, now()) {
                Ok(p) => p,
                // Every endpoint tried: the last one's answer says why.
                Err(_) if !tried.is_empty() => break,
                Err(reply) => return (Err(reply), None),
            };
            if tried.contains(&picked.key) {
                // Every endpoint was tried: this pick is not made.
                self.cancel(service, picked.key);
                break;
            }
            if !tried.is_empty() {
                // Failed over to another endpoint.
                self.telemetry.record_rule(plan.rule, "retried");
            }
            tried.push(picked.key);
            if picked.protocol < 3 {
                // Not a failure of the endpoint: it cannot carry tunnels at all.
                self.cancel(service, picked.key);
                last = (
                    Reply::error(
                        Status::Unavailable,
                        format!(
                            "{} speaks protocol {}, which has no TCP tunnels",
                            picked.callee, picked.protocol
                        ),
                    ),
                    Some(picked.callee),
                );
                continue;
            }
            let started = now();
            let left = plan.deadline.saturating_duration_since(started);
            let opened = self.open_tunnel_on(&plan, &picked.conn, &picked.kept);
            let opened = tokio::time::timeout(left, opened).await;
            let opened = opened.unwrap_or_else(|_| {
                Err(Reply::error(
                    Status::DeadlineExceeded,
                    format!("{service} did not open the tunnel within {timeout:?}"),
                ))
            });
            let status = opened.as_ref().map_or_else(|r| r.status, |_| Status::Ok);
            self.finish(
                &plan,
                picked.key,
                picked.callee.as_str(),
                (started, now()),
                status,
            );
            match opened {
                Ok((send, recv, leftover)) => {
                    let tunnel = OpenTunnel {
                        send,
                        recv,
                        leftover,
                    };
                    return (Ok(tunnel), Some(picked.callee));
                }
                // The endpoint could not: another may.
                Err(reply) if reply.status.is_failure() => {
                    warn!(
                        "{} could not open a tunnel to {service}: {}",
                        picked.callee, reply.message
                    );
                    last = (reply, Some(picked.callee));
                }
                Err(reply) => return (Err(reply), Some(picked.callee)),
            }
        }
        (Err(last.0), last.1)
    }

    /// Gives back the balancer slot of a pick that was not used.
    fn cancel(&self, service: &str, key: u64) {
        if let Some(b) = self.state().balancers.get_mut(service) {
            b.cancel(&key);
        }
    }

    /// Opens the tunnel's stream on `conn` and reads the callee's answer head.
    async fn open_tunnel_on(
        &self,
        plan: &Plan<'_>,
        conn: &quinn::Connection,
        kept: &KeptStreams,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Bytes), Reply> {
        let lost = |e: &dyn std::fmt::Display| {
            Reply::error(Status::Unavailable, format!("connection to peer lost: {e}"))
        };
        let left = plan.deadline.saturating_duration_since(now());
        let mut head = self.head(plan, left)?;
        head.metadata
            .push((TUNNEL_METADATA, "1"))
            .map_err(|_| too_much_metadata())?;
        let (send, recv) = kept.open_unkept(conn).await.map_err(|e| lost(&e))?;
        // Reset, not finished, if this ends (an error, the deadline) before the tunnel is handed
        // on: the callee must not take it for a client that half-closed.
        let mut send = crate::upstream::tcp::SendHalf(Some(send));
        let Some(stream) = send.0.as_mut() else {
            return Err(lost(&"no stream"));
        };
        write_head(stream, &head).await.map_err(|e| lost(&e))?;
        let mut reader = FrameReader::new(recv);
        let head_bytes = match reader.frame(MAX_HEAD_BYTES).await {
            Ok(b) => b,
            Err(ReadError::Stream(e)) => return Err(lost(&e)),
            Err(e) => {
                return Err(Reply::error(
                    Status::Internal,
                    format!("bad answer from peer: {e}"),
                ));
            }
        };
        let answer = ResponseView::decode(&head_bytes).map_err(|e| {
            Reply::error(Status::Internal, format!("bad answer head from peer: {e}"))
        })?;
        if answer.status != Status::Ok {
            return Err(Reply::error(answer.status, answer.message));
        }
        let (recv, leftover) = reader.into_raw();
        let send = send.keep().ok_or_else(|| lost(&"no stream"))?;
        Ok((send, recv, leftover))
    }

    /// Calls made and retries spent under the retry budget of `service`: `(calls, retries)`.
    pub(crate) fn retry_totals(&self, service: &str) -> (u64, u64) {
        self.state()
            .budgets
            .get(service)
            .map_or((0, 0), RetryBudget::totals)
    }

    /// The route this call takes and the subset it picks from (a weighted split, a mirror).
    fn route<'p>(
        &self,
        svc: Option<&'p mesh_core::policy::ServicePolicy>,
        method: &str,
        options: &CallOptions,
    ) -> route::Decision<'p> {
        route::decide(
            svc.map_or(&[][..], |s| &s.routes[..]),
            method,
            &options.metadata,
            &self.id_text,
            &self.labels,
            random(),
            random(),
        )
    }

    /// The head of a unary attempt and its body, encoded as frames (the head itself, with room for
    /// every metadata entry, never lives across an await); it asks the callee to keep the stream
    /// when `keep`, and the answer says whether it does.
    fn encoded_head(
        &self,
        plan: &Plan<'_>,
        left: Duration,
        keep: bool,
        body: &Bytes,
    ) -> Result<(Framed, bool), Reply> {
        // Made in place and filled, not returned: a head is 600 bytes, and each move copies them.
        let mut head = RequestHead::new(plan.service, plan.method, deadline_ms(left));
        self.fill_head(plan, &mut head)?;
        Ok(crate::wire::encode_head_keeping(
            &mut head,
            keep,
            body.clone(),
        ))
    }

    /// Where a call on `kept`'s connection keeps its stream, and how many may wait there.
    fn keep_on(&self, kept: &Arc<KeptStreams>) -> (Arc<KeptStreams>, usize) {
        (kept.clone(), self.limits.max_concurrent_calls as usize)
    }

    fn head<'a>(&self, plan: &Plan<'a>, left: Duration) -> Result<RequestHead<'a>, Reply> {
        let mut head = RequestHead::new(plan.service, plan.method, deadline_ms(left));
        self.fill_head(plan, &mut head)?;
        Ok(head)
    }

    /// Sets the trace and metadata of `plan` on `head`.
    fn fill_head<'a>(&self, plan: &Plan<'a>, head: &mut RequestHead<'a>) -> Result<(), Reply> {
        head.trace = Some(plan.trace);
        if let Some(id) = plan.on_behalf_of {
            head.metadata
                .push((crate::call::ON_BEHALF_OF_METADATA, id))
                .map_err(|_| too_much_metadata())?;
        }
        for (k, v) in &plan.options.metadata {
            if head.metadata.push((k, v)).is_err() {
                return Err(too_much_metadata());
            }
        }
        Ok(())
    }

    /// Picks the endpoint for the next attempt, made `at`, avoiding those `tried` while others
    /// remain.
    fn pick(
        &self,
        plan: &Plan<'_>,
        subset: &Subset,
        tried: &[u64],
        at: Instant,
    ) -> Result<Picked, Reply> {
        let service = plan.service;
        let zone = self.labels.get("zone").map(String::as_str);
        self.peers.pick(service, subset, tried, |candidates| {
            let mut state = self.state();
            // Looked up before it is made: `entry` would allocate the key on every call.
            if !state.balancers.contains_key(service) {
                let made = Balancer::new(plan.balance.clone());
                state.balancers.insert(service.to_owned(), made);
            }
            state
                .balancers
                .get_mut(service)
                .and_then(|balancer| {
                    balancer.set_config(plan.balance);
                    balancer.pick(candidates, zone, at, random(), random())
                })
                .ok_or_else(|| {
                    Reply::error(
                        Status::Unavailable,
                        format!("every endpoint of service {service} is ejected or at its limit of calls in flight"),
                    )
                })
        })
    }

    /// Feeds the outcome of an attempt, made `(started, ended)`, to the endpoint's breaker and
    /// latency estimate.
    fn finish(
        &self,
        plan: &Plan<'_>,
        key: u64,
        callee: &str,
        (started, ended): (Instant, Instant),
        status: Status,
    ) {
        let service = plan.service;
        let latency = ended.saturating_duration_since(started);
        let outcome = self
            .state()
            .balancers
            .get_mut(service)
            .map_or(Outcome::None, |b| {
                b.finish(&key, latency, !status.is_failure(), ended)
            });
        match outcome {
            Outcome::Ejected(until) => {
                warn!(
                    "ejected {callee} from service {service} for {:?} after failures",
                    until.saturating_duration_since(ended)
                );
                self.telemetry.record_rule(plan.rule, "ejected");
            }
            Outcome::Restored => debug!("{callee} is back in service {service}"),
            Outcome::None => {}
        }
    }

    /// Copies a call to an endpoint of `subset`, in the background; its answer is discarded and
    /// its slowness or failure never reaches the caller.
    fn mirror(&self, plan: &Plan<'_>, body: &Bytes, subset: Subset) {
        let Ok(picked) = self.pick(plan, &subset, &[], now()) else {
            return;
        };
        self.telemetry.record_rule(plan.rule, "mirrored");
        let trace = TraceContext {
            trace_id: [0; 16],
            span_id: random().to_le_bytes(),
            flags: 0,
        };
        let left = plan.deadline.saturating_duration_since(now());
        let Ok((framed, keep)) =
            self.encoded_head(&Plan { trace, ..*plan }, left, picked.protocol >= 4, body)
        else {
            return;
        };
        let kept = keep.then(|| self.keep_on(&picked.kept));
        let service = plan.service.to_owned();
        let max_body = self.limits.max_body_bytes;
        let state = self.state.clone();
        tokio::spawn(async move {
            let started = now();
            let call = send_call(picked.conn, kept, framed, max_body, started);
            let answered = tokio::time::timeout(left, call).await.ok();
            // The mirror's answer is dropped, but its endpoint's health and latency still count.
            let failed = answered.as_ref().is_none_or(|(r, _)| r.status.is_failure());
            let ended = answered.map_or_else(now, |(_, ended)| ended);
            let latency = ended.saturating_duration_since(started);
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = state.balancers.get_mut(&service) {
                b.finish(&picked.key, latency, !failed, ended);
            }
        });
    }
}

/// A TCP tunnel opened to an endpoint: its stream, and what arrived past the answer's head.
pub(crate) struct OpenTunnel {
    pub(crate) send: quinn::SendStream,
    pub(crate) recv: quinn::RecvStream,
    pub(crate) leftover: Bytes,
}

/// A head's deadline for `left`: whole milliseconds, at least one (0 would mean none).
fn deadline_ms(left: Duration) -> u32 {
    u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1)
}

fn too_much_metadata() -> Reply {
    Reply::error(
        Status::InvalidArgument,
        format!(
            "more than {} metadata entries",
            mesh_proto::limits::MAX_METADATA
        ),
    )
}

/// Names checked, metadata keys that are the mesh's own refused.
fn check_request(
    me: &SpiffeId,
    service: &str,
    method: &str,
    options: &CallOptions,
) -> Result<(), Reply> {
    if let Some(id) = &options.on_behalf_of
        && (!me.is_gateway()
            || id.role() != mesh_core::identity::Certified::Cloud
            || id.trust_domain() != me.trust_domain())
    {
        return Err(Reply::error(
            Status::PermissionDenied,
            format!("{me} may not call on behalf of {id}: only a gateway calls for its cloud"),
        ));
    }
    if let Err(e) = mesh_proto::validate_name(service).and(mesh_proto::validate_name(method)) {
        return Err(Reply::error(
            Status::InvalidArgument,
            format!("bad service or method name: {e}"),
        ));
    }
    if let Some((k, _)) = options.metadata.iter().find(|(k, _)| k.starts_with(':')) {
        return Err(Reply::error(
            Status::InvalidArgument,
            format!("metadata key {k:?}: keys starting with ':' are reserved for the mesh"),
        ));
    }
    Ok(())
}

/// Writes a framed head and body on a stream of `conn` and reads the whole answer, for an attempt
/// that `started`; returns the answer and when it ended. With `kept` (the head asks the callee to
/// keep the stream), the call goes on an idle kept stream when there is one, and its stream is
/// kept for the next call when the callee agrees.
async fn send_call(
    conn: quinn::Connection,
    kept: Option<(Arc<KeptStreams>, usize)>,
    framed: Framed,
    max_body: usize,
    started: Instant,
) -> (Reply, Instant) {
    let pool = kept.as_ref().map(|(pool, _)| pool);
    // The attempt's start, then (after a wait to open a stream, or a call sent again) now.
    let mut at = started;
    loop {
        let (send, reader, reused) = match pool.and_then(|p| p.take(at)) {
            Some((send, reader)) => (send, reader, true),
            None => {
                let opened = match pool {
                    Some(pool) => pool.open(&conn).await,
                    None => Some(conn.open_bi().await),
                };
                match opened {
                    Some(Ok((send, recv))) => (send, FrameReader::new(recv), false),
                    Some(Err(e)) => return (lost(&e), now()),
                    // A stream was kept while this call waited to open one: it takes that.
                    None => {
                        at = now();
                        continue;
                    }
                }
            }
        };
        let keep = pool.is_some();
        match exchange(send, reader, &framed, max_body, keep, reused).await {
            Exchange::Answered(reply, again) => {
                // One clock read for the stream kept and the attempt's end.
                let ended = now();
                if let (Some((send, reader)), Some((pool, max))) = (again, &kept) {
                    pool.put(send, reader, *max, ended);
                }
                return (reply, ended);
            }
            // The callee ended the idle stream before it read the call (it was idle for
            // `kept::IDLE_BOUND`): the call goes on another stream. Only a reused stream ends
            // so, and the pool is finite: the loop ends.
            Exchange::Unread => {}
        }
        at = now();
    }
}

/// How a call on one stream went.
// Returned once per call and matched at once: boxing the stream would allocate for every call.
#[allow(clippy::large_enum_variant)]
enum Exchange {
    /// The answer (or why there is none), and the stream when the callee keeps it.
    Answered(Reply, Option<(quinn::SendStream, FrameReader)>),
    /// The callee reset a reused stream as idle before any answer: it never read the call.
    Unread,
}

fn lost(e: &dyn std::fmt::Display) -> Reply {
    Reply::error(Status::Unavailable, format!("connection to peer lost: {e}"))
}

fn bad_answer(what: &str, e: &dyn std::fmt::Display) -> Reply {
    Reply::error(Status::Internal, format!("bad answer {what}from peer: {e}"))
}

/// One call on `send` and `reader`: the head (asking to keep the stream when `keep`) and the body,
/// then the answer. `reused`: the stream carried an earlier call.
async fn exchange(
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    framed: &Framed,
    max_body: usize,
    keep: bool,
    reused: bool,
) -> Exchange {
    let answered = |reply| Exchange::Answered(reply, None);
    // A clone: the call is sent again if a reused stream turns out to have ended unread.
    let written = if keep {
        framed.clone().write(&mut send).await
    } else {
        write_encoded(&mut send, framed.clone()).await
    };
    let keep = match written {
        Ok(()) => keep,
        // The callee wants no more of the body: it answered already (a refusal by policy, a
        // busy node), and the answer says why.
        Err(quinn::WriteError::Stopped(_)) => false,
        Err(e) => return answered(lost(&e)),
    };
    let head_bytes = match reader.next_frame(MAX_HEAD_BYTES).await {
        Ok(Some(b)) => b,
        // The callee reset the reused stream as idle, before it read this call: sent again. A
        // stream ended any other way (its task died) may have carried the call to the callee,
        // and the call is not sent twice.
        Err(ReadError::Stream(quinn::ReadError::Reset(code)))
            if reused && code == KEPT_IDLE_CODE.into() =>
        {
            return Exchange::Unread;
        }
        Ok(None) => return answered(bad_answer("", &ReadError::Truncated { got: 0, want: 1 })),
        Err(ReadError::Stream(e)) => return answered(lost(&e)),
        Err(e) => return answered(bad_answer("", &e)),
    };
    // Taken out of the head before the body is awaited: the head (with room for every metadata
    // entry) would otherwise live in every call's future.
    let (status, message, leaf, kept) = match ResponseView::decode(&head_bytes) {
        Ok(head) => (
            head.status,
            head.message.to_owned(),
            // A leaf named by the callee is a label for counting, checked as a name and
            // nothing more.
            head.metadata
                .get(crate::call::LEAF_METADATA)
                .filter(|v| mesh_proto::validate_name(v).is_ok())
                .map(std::sync::Arc::from),
            keep && head.metadata.contains_key(KEEP_METADATA),
        ),
        Err(e) => return answered(bad_answer("head ", &e)),
    };
    // A kept stream's answer ends with its body; any other ends with the stream.
    let body = if kept {
        reader.frame(max_body).await
    } else {
        reader.unary_body(max_body).await
    };
    let body = match body {
        Ok(b) => b,
        Err(ReadError::Stream(e)) => return answered(lost(&e)),
        Err(e) => return answered(bad_answer("body ", &e)),
    };
    let reply = Reply {
        status,
        message,
        body,
        leaf,
    };
    // Kept only between answers: bytes already past this one (an answer to a call not yet
    // made) are not taken for the next call's.
    let again = kept && !reader.has_buffered();
    Exchange::Answered(reply, again.then_some((send, reader)))
}
