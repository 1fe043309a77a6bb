//! The callee's side of a call: read the head, admit (authorization and rate limits), dispatch to
//! the hosted service's upstream, write the reply.
//!
//! Streams whose service name is reserved (`_control`; `_enroll` and `_tunnel` next) go to the
//! [`ReservedService`] registered for it instead: a small router, not special cases.
//!
//! Bad bytes on a call stream end that stream with `InvalidArgument`; they never end the
//! connection, other calls, or the process.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use mesh_core::limits::RateLimiter;
use mesh_core::{MethodName, NodeName, ServiceName, SpiffeId};
use mesh_proto::control::Span;
use mesh_proto::heads::RequestView;
use mesh_proto::limits::MAX_HEAD_BYTES;
use mesh_proto::{
    KEEP_METADATA, ResponseHead, STREAM_METADATA, Status, TUNNEL_METADATA, TUNNEL_METHOD,
};
use tracing::{debug, warn};

use crate::call::{CallContext, Reply};
use crate::clock::{now, since};
use crate::config::Limits;
use crate::control::telemetry::{TelemetrySink, unix_us};
use crate::hosted::Hosted;
use crate::identity::CertificateClaims;
use crate::peers::PeerSet;
use crate::policy::{Policy, PolicyCell};
use crate::wire::{FrameReader, write_encoded, write_head};

/// Serves the streams of a reserved service (`_control` on a gateway). The request head was read
/// already; the handler owns the stream from here.
pub trait ReservedService: Send + Sync + 'static {
    /// Runs one stream from `caller` (what its verified certificate says) until it ends.
    fn serve(
        &self,
        caller: Arc<CertificateClaims>,
        remote: SocketAddr,
        send: quinn::SendStream,
        reader: FrameReader,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// The callee side of every call this node serves.
pub(crate) struct Server {
    pub(crate) name: NodeName,
    pub(crate) limits: Limits,
    pub(crate) hosted: Arc<Hosted>,
    pub(crate) policy: Arc<PolicyCell>,
    pub(crate) telemetry: Arc<TelemetrySink>,
    pub(crate) peers: Arc<PeerSet>,
    pub(crate) reserved: HashMap<&'static str, Arc<dyn ReservedService>>,
    admission: Mutex<AdmissionState>,
    /// Bytes of request bodies from peers held now, over every connection
    /// (`limits.max_buffered_bytes`); a peer holds at most a quarter of it.
    bodies: tokio::sync::Semaphore,
    /// Each peer's share of `bodies`, over all its connections (a peer may hold several: one
    /// each way, and more while a renewal replaces them); dropped with its last connection.
    shares: Mutex<HashMap<SpiffeId, std::sync::Weak<tokio::sync::Semaphore>>>,
}

/// Why a streamed body could not be gathered.
#[derive(Debug)]
enum GatherError {
    /// The memory for bodies is spent.
    Busy,
    Read(crate::wire::ReadError),
}

impl From<crate::wire::ReadError> for GatherError {
    fn from(e: crate::wire::ReadError) -> Self {
        GatherError::Read(e)
    }
}

/// Streams a peer may open on a new connection, before it uses them: 4, or
/// `limits.max_concurrent_calls` if less.
///
/// quinn sets room aside for every stream a peer may open (an entry in each of two tables,
/// about 21 KB a connection at 256), which an idle peer never uses: 100 peers cost 2 MB for
/// nothing. A connection starts here and grows as its peer uses it ([`StreamAllowance`]). With
/// kept streams, a connection's calls open few streams; one that only carries a control session
/// (a node's to its gateway, 10,000 on one gateway) opens one.
pub(crate) fn initial_streams(limits: &Limits) -> u32 {
    INITIAL_STREAMS.min(limits.max_concurrent_calls).max(1)
}

const INITIAL_STREAMS: u32 = 4;

/// How many streams one connection's peer may open: from [`initial_streams`], four times more
/// whenever the peer has opened more than half as many over the connection's life, up to
/// `limits.max_concurrent_calls`. It never shrinks.
///
/// Streams opened, not streams open: quinn gives a peer new credit only when it frees a stream,
/// which a peer can delay (a call whose reply it never reads, a stream it never resets), while
/// the node's own work on the stream is long done. Counted this way, a peer reaches the whole
/// allowance before it can run out of credit; a connection that opened fewer than 3 streams
/// stays at 4, one that opened 33 has them all (4, 16, 64, 256).
struct StreamAllowance {
    allowed: u32,
    max: u32,
    opened: u32,
}

impl StreamAllowance {
    fn new(limits: &Limits) -> StreamAllowance {
        StreamAllowance {
            allowed: initial_streams(limits),
            max: limits.max_concurrent_calls.max(1),
            opened: 0,
        }
    }

    /// A stream was accepted on `conn`: raises the peer's allowance once it has opened more
    /// than half of it, before it runs out (the new credit takes a round trip).
    fn opened(&mut self, conn: &quinn::Connection) {
        self.opened = self.opened.saturating_add(1);
        if self.allowed < self.max && self.opened.saturating_mul(2) > self.allowed {
            self.allowed = self.allowed.saturating_mul(4).min(self.max);
            conn.set_max_concurrent_bi_streams(self.allowed.into());
        }
    }
}

/// Bytes of a request body taken from its peer's share and the node's budget; given back when
/// dropped.
#[derive(Default)]
struct BodyHold<'a> {
    conn: Option<tokio::sync::SemaphorePermit<'a>>,
    node: Option<tokio::sync::SemaphorePermit<'a>>,
}

/// Rate-limit buckets and remembered authorization verdicts.
#[derive(Default)]
struct AdmissionState {
    /// Rate-limit buckets: per limit, per caller.
    buckets: HashMap<String, RateLimiter<SpiffeId>>,
    /// The policy generation the limits in `buckets` are of (a limit the policy dropped is
    /// forgotten).
    buckets_generation: u64,
    /// Remembered admissions, by a hash of (policy version, caller, service, method).
    verdicts: mesh_core::FastMap<u64, (u64, SpiffeId, ServiceName, MethodName, Arc<Admission>)>,
    /// The peer-label generation the verdicts were made under.
    labels_generation: u64,
}

/// What the policy says of one (caller, service, method).
struct Admission {
    verdict: mesh_core::authz::Verdict,
    /// Index of the rate limit that applies, in the policy's list.
    rate_limit: Option<usize>,
}

/// What a stream carries.
enum Incoming {
    /// A call.
    Call {
        ctx: Box<CallContext>,
        /// A TCP tunnel.
        tunnel: bool,
        /// No deadline from the caller (a streamed call: each step is bounded instead).
        no_deadline: bool,
        /// A unary call whose caller asks to keep the stream for its next call.
        keep: bool,
    },
    Reserved(Arc<dyn ReservedService>),
}

impl Server {
    pub(crate) fn new(
        name: NodeName,
        limits: Limits,
        hosted: Arc<Hosted>,
        policy: Arc<PolicyCell>,
        telemetry: Arc<TelemetrySink>,
        peers: Arc<PeerSet>,
        reserved: HashMap<&'static str, Arc<dyn ReservedService>>,
    ) -> Self {
        let bodies = tokio::sync::Semaphore::new(limits_bodies(&limits));
        Server {
            name,
            limits,
            hosted,
            policy,
            telemetry,
            peers,
            reserved,
            admission: Mutex::new(AdmissionState::default()),
            bodies,
            shares: Mutex::default(),
        }
    }

    /// The share of the body budget of peer `id`, which all its connections draw on: a quarter
    /// of the budget (at least one body).
    fn body_share(&self, id: &SpiffeId) -> Arc<tokio::sync::Semaphore> {
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(share) = shares.get(id).and_then(std::sync::Weak::upgrade) {
            return share;
        }
        // Peers that left are forgotten now and then: at most twice the peers with a share.
        if shares.len() >= 64 && shares.len().is_power_of_two() {
            shares.retain(|_, share| share.strong_count() > 0);
        }
        // (At least one body, should limits be built in code without the config's check.)
        let budget = limits_bodies(&self.limits);
        let share = Arc::new(tokio::sync::Semaphore::new(
            (budget / 4).max(self.limits.max_body_bytes).min(budget),
        ));
        shares.insert(id.clone(), Arc::downgrade(&share));
        share
    }

    /// Takes `bytes` more of body into `hold`: from the peer's share `conn`, then from the
    /// node's budget; false, taking nothing, if either is spent. A body is never left waiting
    /// unread: its bytes would fill QUIC's connection window and stall the bodies being read.
    fn hold_body<'a>(
        &'a self,
        conn: &'a tokio::sync::Semaphore,
        hold: &mut BodyHold<'a>,
        bytes: usize,
    ) -> bool {
        let Ok(n) = u32::try_from(bytes) else {
            return false;
        };
        if n == 0 {
            return true;
        }
        let Ok(c) = conn.try_acquire_many(n) else {
            return false;
        };
        let Ok(g) = self.bodies.try_acquire_many(n) else {
            return false;
        };
        match &mut hold.conn {
            Some(held) => held.merge(c),
            None => hold.conn = Some(c),
        }
        match &mut hold.node {
            Some(held) => held.merge(g),
            None => hold.node = Some(g),
        }
        true
    }

    /// Why a body was refused: the memory for bodies is spent.
    fn busy(&self) -> Reply {
        let max = limits_bodies(&self.limits);
        Reply::error(
            Status::Unavailable,
            format!(
                "node {} is busy: {} of {max} bytes of call bodies are held \
                 (limits.max_buffered_bytes); try again",
                self.name,
                max - self.bodies.available_permits(),
            ),
        )
    }

    /// Reads a unary body once its announced length is held (see [`Server::hold_body`]), all by
    /// `deadline`; refuses it (and stops the stream) when that memory is spent. The hold goes
    /// with the body. The stream ends after the body, unless it is `kept`.
    async fn read_unary_body<'a>(
        &'a self,
        reader: &mut FrameReader,
        conn: &'a tokio::sync::Semaphore,
        deadline: tokio::time::Instant,
        kept: bool,
    ) -> Result<(Bytes, BodyHold<'a>), Reply> {
        let max = self.limits.max_body_bytes;
        let late = || Reply::error(Status::InvalidArgument, "request not received in time");
        let bad = |e: crate::wire::ReadError| {
            Reply::error(Status::InvalidArgument, format!("request: {e}"))
        };
        // One bound for the whole read (one timer at most, and one instance of its code).
        let read = async {
            let len = reader.next_len(max).await.map_err(bad)?;
            let mut hold = BodyHold::default();
            if !self.hold_body(conn, &mut hold, len.unwrap_or(0)) {
                reader.stop();
                debug!("refused a body of {len:?} bytes: the memory for bodies is spent");
                return Err(self.busy());
            }
            let body = if kept {
                reader.frame(max).await
            } else {
                reader.unary_body(max).await
            };
            Ok((body.map_err(bad)?, hold))
        };
        let (body, hold) = crate::clock::bounded(|| deadline, read)
            .await
            .ok_or_else(late)??;
        Ok((body, hold))
    }

    /// Gathers a streamed body for an upstream that takes it whole, holding each frame's
    /// length before reading it (see [`Server::hold_body`]).
    async fn gather_body<'a>(
        &'a self,
        reader: &mut FrameReader,
        conn: &'a tokio::sync::Semaphore,
    ) -> Result<(Bytes, BodyHold<'a>), GatherError> {
        use crate::wire::{MAX_CHUNK_BYTES, ReadError};
        let max = self.limits.max_body_bytes;
        let mut hold = BodyHold::default();
        let mut out: Option<bytes::BytesMut> = None;
        let mut first: Option<Bytes> = None;
        while let Some(len) = reader.next_len(MAX_CHUNK_BYTES).await? {
            let total = first.as_ref().map_or(0, Bytes::len) + out.as_ref().map_or(0, |o| o.len());
            if total + len > max {
                return Err(ReadError::BodyTooLarge { max }.into());
            }
            if !self.hold_body(conn, &mut hold, len) {
                reader.stop();
                return Err(GatherError::Busy);
            }
            let frame = reader.frame(MAX_CHUNK_BYTES).await?;
            match (&mut out, first.take()) {
                // The first frame is kept as it came: a body of one frame is never copied.
                (None, None) => first = Some(frame),
                (None, Some(f)) => {
                    let mut o = bytes::BytesMut::with_capacity(f.len() + frame.len());
                    o.extend_from_slice(&f);
                    o.extend_from_slice(&frame);
                    out = Some(o);
                }
                (Some(o), _) => o.extend_from_slice(&frame),
            }
        }
        let body = match out {
            Some(o) => o.freeze(),
            None => first.unwrap_or_default(),
        };
        Ok((body, hold))
    }

    fn admission_state(&self) -> MutexGuard<'_, AdmissionState> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves every call a connection from `caller` carries, until it closes.
    pub(crate) async fn serve_connection(
        self: Arc<Self>,
        conn: quinn::Connection,
        claims: Arc<CertificateClaims>,
    ) {
        let remote = conn.remote_address();
        // Tunnels may stay open for hours: they take at most half of the connection's streams,
        // so calls always have the other half.
        let tunnels = Arc::new(tokio::sync::Semaphore::new(
            (self.limits.max_concurrent_calls as usize / 2).max(1),
        ));
        // Request bodies: a peer holds at most a quarter of the node's budget over all its
        // connections, so one peer cannot take it all.
        let bodies = self.body_share(&claims.id);
        let mut streams = StreamAllowance::new(&self.limits);
        while let Ok((send, recv)) = conn.accept_bi().await {
            let server = self.clone();
            let claims = claims.clone();
            let tunnels = tunnels.clone();
            let bodies = bodies.clone();
            streams.opened(&conn);
            tokio::spawn(async move {
                server
                    .serve_stream(claims, remote, send, recv, tunnels, bodies)
                    .await
            });
        }
    }

    /// Reads a call from a stream, serves it, writes the reply; and the next call after it, while
    /// the caller keeps the stream (protocol 4, see `kept`).
    async fn serve_stream(
        &self,
        claims: Arc<CertificateClaims>,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        tunnels: Arc<tokio::sync::Semaphore>,
        bodies: Arc<tokio::sync::Semaphore>,
    ) {
        let caller = claims.id.clone();
        let mut reader = FrameReader::new(recv);
        let mut idle = crate::kept::IdleBound::default();
        loop {
            let started = now();
            let deadline = tokio::time::Instant::from_std(started + self.limits.call_timeout);
            // The request body's memory, held until its reply is written: a caller that does not
            // read its replies holds its share, and new bodies wait.
            let mut held = BodyHold::default();
            // Kept for the next call: asked by the caller, and the whole request read.
            let mut keep = false;
            let read = crate::clock::bounded(
                || deadline,
                self.read_head(caller.clone(), &mut reader, started),
            )
            .await;
            let reply = match read {
                Some(Ok(Incoming::Call {
                    ctx,
                    tunnel,
                    no_deadline,
                    keep: asked,
                })) => {
                    // Admitted before its body is read: a caller the policy refuses never gets a
                    // body buffered.
                    let labels = || self.peers.labels_of(&caller).unwrap_or_default();
                    match self.admit(&ctx, labels) {
                        // Refused: no body is read, and the stream ends with the answer.
                        Err(refused) => {
                            reader.stop();
                            refused
                        }
                        Ok(()) if tunnel => {
                            return Box::pin(self.serve_tunnel(*ctx, send, reader, tunnels)).await;
                        }
                        Ok(()) if ctx.streaming => {
                            let deadline = (!no_deadline).then_some(ctx.deadline);
                            return Box::pin(
                                self.serve_streamed(*ctx, deadline, send, reader, bodies),
                            )
                            .await;
                        }
                        Ok(()) => {
                            match self
                                .read_unary_body(&mut reader, &bodies, deadline, asked)
                                .await
                            {
                                Ok((body, hold)) => {
                                    held = hold;
                                    keep = asked;
                                    self.dispatch_traced(*ctx, body).await
                                }
                                Err(reply) => reply,
                            }
                        }
                    }
                }
                // A task of its own: a reserved stream (a node's control session on a gateway)
                // lasts as long as its node, and this task's size is that of a call's largest
                // step (2 KB a node, on a gateway with 10,000).
                Some(Ok(Incoming::Reserved(handler))) => {
                    tokio::spawn(handler.serve(claims, remote, send, reader));
                    return;
                }
                Some(Err(reply)) => reply,
                None => Reply::error(Status::InvalidArgument, "request not received in time"),
            };
            if !keep && reply.status == Status::InvalidArgument {
                warn!(
                    "refused a call from {caller} (stream {}): {}",
                    send.id(),
                    reply.message
                );
                // Nothing more of this request is wanted (and the stream is not kept).
                reader.stop();
            }
            let kept = self.write_held_reply(&mut send, reply, keep).await;
            drop(held);
            if !kept {
                return;
            }
            // The stream is kept: its next call, or its end.
            let since = tokio::time::Instant::now();
            match idle.wait(since, reader.more()).await {
                Some(Ok(true)) => {}
                // The caller ended it, or reset it.
                Some(Ok(false)) => {
                    let _ = send.finish();
                    return;
                }
                Some(Err(_)) => return,
                // Idle: ended, with the call that may race the end unread: reset with the code
                // that tells the caller to send it again on a new stream.
                None => {
                    reader.stop_with(mesh_proto::KEPT_IDLE_CODE);
                    let _ = send.reset(mesh_proto::KEPT_IDLE_CODE.into());
                    return;
                }
            }
        }
    }

    /// The head of a call whose stream had bytes at `started`, parsed and checked.
    async fn read_head(
        &self,
        caller: SpiffeId,
        reader: &mut FrameReader,
        started: std::time::Instant,
    ) -> Result<Incoming, Reply> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Reply::error(Status::InvalidArgument, format!("{what}: {e}"))
        };
        let head_bytes = reader
            .frame(MAX_HEAD_BYTES)
            .await
            .map_err(|e| bad("request head", &e))?;
        let head = RequestView::decode(&head_bytes).map_err(|e| bad("request head", &e))?;
        if head.service.starts_with('_') {
            return match self.reserved.get(head.service) {
                Some(handler) => Ok(Incoming::Reserved(handler.clone())),
                None => Err(Reply::error(
                    Status::NotFound,
                    format!(
                        "node {} serves no {} here (is it a gateway?)",
                        self.name, head.service
                    ),
                )),
            };
        }
        // A hosted service's name is shared with it, not copied from the head. Its upstream is
        // looked up when the call is served: a service removed or replaced meanwhile is so.
        let service = match self.hosted.name_of(head.service) {
            Some(service) => service,
            None => ServiceName::try_from(head.service).map_err(|e| bad("service name", &e))?,
        };
        let method = MethodName::try_from(head.method).map_err(|e| bad("method name", &e))?;
        let timeout = if head.deadline_ms == 0 {
            self.limits.call_timeout
        } else {
            Duration::from_millis(head.deadline_ms.into())
                .min(self.limits.call_timeout.max(Duration::from_secs(3600)))
        };
        // One walk of the metadata: the mesh's own entries (`:stream`, `x-starling-*`) are never
        // passed on from a peer; the caller's are.
        let (mut streaming, mut tunnel, mut keep) = (false, false, false);
        let mut claimed = None;
        let mut metadata = Vec::new();
        for (key, value) in head.metadata.iter() {
            match key {
                STREAM_METADATA => streaming = true,
                TUNNEL_METADATA => tunnel = true,
                KEEP_METADATA => keep = true,
                crate::call::ON_BEHALF_OF_METADATA => {
                    claimed.get_or_insert(value);
                }
                _ if crate::call::is_mesh_key(key) => {}
                _ => metadata.push((key.to_owned(), value.to_owned())),
            }
        }
        let no_deadline = streaming && head.deadline_ms == 0;
        if tunnel && (streaming || head.method != TUNNEL_METHOD) {
            return Err(Reply::error(
                Status::InvalidArgument,
                format!(
                    "a TCP tunnel is opened with method {TUNNEL_METHOD} and is not a streamed call"
                ),
            ));
        }
        let caller = match claimed {
            None => caller,
            Some(claimed) => on_behalf_of(&caller, claimed)?,
        };
        let ctx = CallContext {
            // Asked of the policy only for an upstream that resends (see `dispatch`).
            idempotent: false,
            caller,
            service,
            method,
            metadata,
            // From when the call's first bytes were there (a clock read spared): its head
            // follows them, and one that trickles in spends its call's time.
            deadline: started + timeout,
            trace: head.trace,
            streaming,
        };
        Ok(Incoming::Call {
            ctx: Box::new(ctx),
            tunnel,
            no_deadline,
            // A streamed call or a tunnel ends with its stream.
            keep: keep && !streaming && !tunnel,
        })
    }

    /// Serves a TCP tunnel (admitted already): connects to the service's TCP upstream and carries
    /// bytes both ways until both sides close, one aborts, or the tunnel is idle; or answers why
    /// not (`Unavailable` when the upstream refuses: the caller counts it against this endpoint).
    async fn serve_tunnel(
        &self,
        ctx: CallContext,
        mut send: quinn::SendStream,
        reader: FrameReader,
        tunnels: Arc<tokio::sync::Semaphore>,
    ) {
        use crate::upstream::tcp;
        let service = ctx.service.as_str();
        let upstream = self.hosted.get(service);
        let permit = tunnels.try_acquire_owned();
        let reply = match upstream.as_deref().map(|u| u.tcp_authority()) {
            Some(Some(_)) if permit.is_err() => Reply::error(
                Status::ResourceExhausted,
                format!(
                    "node {} carries at most {} tunnels from one peer (half of \
                     limits.max_concurrent_calls; calls keep the other half)",
                    self.name,
                    (self.limits.max_concurrent_calls / 2).max(1)
                ),
            ),
            None => Reply::error(
                Status::NotFound,
                format!("service {service} is not hosted on node {}", self.name),
            ),
            Some(None) => Reply::error(
                Status::InvalidArgument,
                format!(
                    "service {service} on node {} is not a TCP service: call it instead",
                    self.name
                ),
            ),
            Some(Some(authority)) => {
                let left = ctx
                    .deadline
                    .saturating_duration_since(now())
                    .min(self.limits.connect_timeout);
                match tcp::connect(authority, left).await {
                    Ok(stream) => {
                        // Within the call timeout: a caller that grants the stream no credit
                        // does not keep the upstream's connection and a tunnel's place.
                        let limit = self.limits.call_timeout;
                        let ok = ResponseHead::new(Status::Ok, "");
                        let head = write_head(&mut send, &ok);
                        match crate::clock::bounded(|| tokio::time::Instant::now() + limit, head)
                            .await
                        {
                            Some(Ok(())) => {}
                            Some(Err(e)) => {
                                debug!("tunnel to {service}: the caller left: {e}");
                                return;
                            }
                            None => {
                                debug!("tunnel to {service}: the caller took no answer in time");
                                let _ = send.reset(0u32.into());
                                return;
                            }
                        }
                        let (recv, leftover) = reader.into_raw();
                        let ended = tcp::pump(
                            stream,
                            send,
                            recv,
                            leftover,
                            self.limits.tcp_idle_timeout,
                            tcp::End::Upstream,
                            |_, _| {},
                        )
                        .await;
                        debug!("tunnel from {} to {service} ended: {ended:?}", ctx.caller);
                        return;
                    }
                    Err(e) => Reply::error(
                        Status::Unavailable,
                        format!(
                            "the upstream of {service} on node {} refused: {e}",
                            self.name
                        ),
                    ),
                }
            }
        };
        let _ = reader.into_inner().stop(0u32.into());
        // Bounded, as every reply is.
        self.write_held_reply(&mut send, reply, false).await;
    }

    /// A call made on this node for a service it hosts: admitted and served without the network.
    pub(crate) async fn serve_local(
        &self,
        ctx: CallContext,
        body: Bytes,
        labels: &BTreeMap<String, String>,
    ) -> Reply {
        if let Err(refused) = self.admit(&ctx, || labels.clone()) {
            return refused;
        }
        self.dispatch(ctx, body).await
    }

    /// Serves a streamed call: an upstream that streams gets the body chunk by chunk and answers
    /// the same way; any other gets the body gathered (up to the body bound) and answers once.
    /// Without a deadline from the caller, each step must make progress within `call_timeout`.
    async fn serve_streamed(
        &self,
        mut ctx: CallContext,
        deadline: Option<std::time::Instant>,
        mut send: quinn::SendStream,
        mut reader: FrameReader,
        bodies: Arc<tokio::sync::Semaphore>,
    ) {
        let time = crate::call::StreamTime {
            deadline: deadline.map(Into::into),
            step: self.limits.call_timeout,
        };
        let upstream = self.hosted.get(ctx.service.as_str());
        // The gathered body's memory, held until its reply is written.
        let mut held = BodyHold::default();
        let reply = match upstream {
            Some(up) if up.streams() => {
                let max = self.limits.max_stream_bytes;
                match up
                    .serve_streamed(&ctx, time, &mut send, &mut reader, max)
                    .await
                {
                    Ok(()) => return,
                    Err(reply) => reply,
                }
            }
            _ => {
                let gathered = time.step(self.gather_body(&mut reader, &bodies)).await;
                match gathered {
                    Ok(Ok((body, hold))) => {
                        held = hold;
                        if deadline.is_none() {
                            ctx.deadline = now() + self.limits.call_timeout;
                        }
                        self.dispatch_traced(ctx, body).await
                    }
                    Ok(Err(GatherError::Busy)) => self.busy(),
                    Ok(Err(GatherError::Read(e))) => {
                        Reply::error(Status::InvalidArgument, format!("request: {e}"))
                    }
                    Err(e) => Reply::error(Status::DeadlineExceeded, e.message),
                }
            }
        };
        if reply.status == Status::InvalidArgument {
            let _ = reader.into_inner().stop(0u32.into());
        }
        self.write_held_reply(&mut send, reply, false).await;
        drop(held);
    }

    /// Serves a call and records the callee's span when the caller sampled it.
    async fn dispatch_traced(&self, ctx: CallContext, body: Bytes) -> Reply {
        let Some(trace) = ctx.trace.filter(|t| t.flags & 1 == 1) else {
            return self.dispatch(ctx, body).await;
        };
        let (service, method) = (
            ctx.service.as_str().to_owned(),
            ctx.method.as_str().to_owned(),
        );
        let started = now();
        let started_wall = unix_us();
        let reply = self.dispatch(ctx, body).await;
        self.telemetry.record_span(Span {
            trace_id: trace.trace_id,
            span_id: crate::rng::random().to_le_bytes(),
            parent_span_id: Some(trace.span_id),
            client: false,
            // A call a microcontroller served is its span, under the node that vouches for it.
            node: match &reply.leaf {
                Some(leaf) => format!("{}/leaf/{leaf}", self.name),
                None => self.name.as_str().to_owned(),
            },
            service,
            method,
            start_unix_us: started_wall,
            duration_us: since(started).as_micros() as u64,
            status: reply.status,
        });
        reply
    }

    /// Serves a call for a service this node hosts.
    async fn dispatch(&self, mut ctx: CallContext, body: Bytes) -> Reply {
        let Some(upstream) = self.hosted.get(ctx.service.as_str()) else {
            if self.hosted.is_intermittent(ctx.service.as_str()) {
                return Reply::error(
                    Status::Unavailable,
                    format!(
                        "the device serving {} on node {} is not connected",
                        ctx.service, self.name
                    ),
                );
            }
            return Reply::error(
                Status::NotFound,
                format!(
                    "service {} is not hosted on node {}",
                    ctx.service, self.name
                ),
            );
        };
        // Only an upstream that may send a call twice (a serial line) needs to know whether the
        // policy allows it: other calls do not pay for the lookup.
        if upstream.resends() {
            ctx.idempotent = self
                .policy
                .policy()
                .is_some_and(|p| p.is_idempotent(ctx.service.as_str(), ctx.method.as_str()));
        }
        // Builtins answer without waiting on anything: no deadline timer to arm.
        let body = match upstream.serve_now(body) {
            Ok(reply) => return reply,
            Err(body) => body,
        };
        let left = ctx.deadline.saturating_duration_since(now());
        // Boxed: the upstreams that wait (HTTP, a serial line) have large futures, and every
        // call's task would otherwise carry one (and copy it when spawned).
        let serve = Box::pin(upstream.serve(&ctx, body, self.limits.max_body_bytes));
        match tokio::time::timeout(left, serve).await {
            Ok(reply) => reply,
            Err(_) => Reply::error(
                Status::DeadlineExceeded,
                format!(
                    "upstream of {} on node {} did not answer within the deadline",
                    ctx.service, self.name
                ),
            ),
        }
    }

    /// Authorization and rate limits; `Err` is the refusal to send back.
    fn admit(
        &self,
        ctx: &CallContext,
        caller_labels: impl FnOnce() -> BTreeMap<String, String>,
    ) -> Result<(), Reply> {
        let (generation, policy) = match self.policy.for_admission() {
            Ok(Some(held)) => held,
            Ok(None) => return Ok(()),
            Err(damaged) => {
                self.telemetry.record_rule("damaged_policy", "denied");
                return Err(Reply::error(
                    Status::PermissionDenied,
                    format!(
                        "node {} refuses every call: its saved policy is damaged ({damaged}); \
                         it serves again when its gateway sends a good bundle",
                        self.name
                    ),
                ));
            }
        };
        let (service, method) = (ctx.service.as_str(), ctx.method.as_str());
        // A call a gateway makes for its cloud is judged as the cloud, which has no labels: those
        // of the connection (or the node) it came through are the gateway's.
        let labels = || {
            if ctx.caller.role() == mesh_core::identity::Certified::Cloud {
                BTreeMap::new()
            } else {
                caller_labels()
            }
        };
        let admission = self.admission(generation, &policy, ctx, labels);
        let verdict = &admission.verdict;
        if verdict.denied {
            let action = if verdict.allow { "audited" } else { "denied" };
            self.telemetry.record_rule(&verdict.rule, action);
            let caller = ctx.caller.to_string();
            self.telemetry.audit(
                action,
                vec![
                    ("caller".into(), caller.clone()),
                    ("service".into(), service.to_owned()),
                    ("method".into(), method.to_owned()),
                    ("rule".into(), verdict.rule.clone()),
                ],
            );
            if !verdict.allow {
                return Err(Reply::error(
                    Status::PermissionDenied,
                    format!(
                        "{caller} may not call {service}.{method} (rule {})",
                        verdict.rule
                    ),
                ));
            }
        } else {
            self.telemetry.record_rule(&verdict.rule, "allowed");
        }
        if let Some(limit) = admission.rate_limit.and_then(|i| policy.rate_limits.get(i)) {
            let now = now();
            let mut state = self.admission_state();
            let allowed = state.buckets.entry(limit.name.clone()).or_default().take(
                &ctx.caller,
                limit.per_second,
                limit.burst,
                now,
            );
            drop(state);
            if !allowed {
                self.telemetry.record_rule(&limit.name, "rate_limited");
                return Err(Reply::error(
                    Status::ResourceExhausted,
                    format!(
                        "{} is over its rate limit {} ({} calls a second) for {service}",
                        ctx.caller, limit.name, limit.per_second
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What the policy says of this caller, service and method under the policy cell's
    /// `generation` (it changes with every bundle, whatever its number): the authorization verdict
    /// and the rate limit that applies. Remembered, so that a 50-rule policy
    /// costs one lookup per call, not 50 glob matches; forgotten when a peer's labels may have
    /// changed.
    fn admission(
        &self,
        generation_of_policy: u64,
        policy: &Policy,
        ctx: &CallContext,
        caller_labels: impl FnOnce() -> BTreeMap<String, String>,
    ) -> Arc<Admission> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            generation_of_policy,
            &ctx.caller,
            ctx.service.as_str(),
            ctx.method.as_str(),
        )
            .hash(&mut h);
        let key = h.finish();
        let generation = self.peers.labels_generation();
        let mut state = self.admission_state();
        // A newer policy: the buckets of limits it dropped are forgotten (a call still holding
        // an older policy does not go back). Done here, where every admitted call passes, so a
        // policy without limits frees them too.
        if generation_of_policy > state.buckets_generation {
            state
                .buckets
                .retain(|name, _| policy.rate_limits.iter().any(|l| l.name == *name));
            state.buckets_generation = generation_of_policy;
        }
        if state.labels_generation != generation {
            state.verdicts.clear();
            state.labels_generation = generation;
        }
        if let Some((v, caller, service, method, admission)) = state.verdicts.get(&key)
            && *v == generation_of_policy
            && *caller == ctx.caller
            && *service == ctx.service
            && *method == ctx.method
        {
            return admission.clone();
        }
        drop(state);
        let caller = ctx.caller.to_string();
        let rate_limit = policy.rate_limit(&caller, ctx.service.as_str());
        let verdict = policy.authz.decide(
            &caller,
            &caller_labels(),
            ctx.service.as_str(),
            ctx.method.as_str(),
        );
        let admission = Arc::new(Admission {
            verdict,
            rate_limit,
        });
        let mut state = self.admission_state();
        if state.verdicts.len() >= 4096 {
            state.verdicts.clear();
        }
        state.verdicts.insert(
            key,
            (
                generation_of_policy,
                ctx.caller.clone(),
                ctx.service.clone(),
                ctx.method.clone(),
                admission.clone(),
            ),
        );
        admission
    }
}

/// The identity a call is made for when the caller names one: only a certified gateway may, and
/// only for its trust domain's cloud; anything else is refused, never taken as the caller.
fn on_behalf_of(caller: &SpiffeId, claimed: &str) -> Result<SpiffeId, Reply> {
    let denied = |why: String| Reply::error(Status::PermissionDenied, why);
    if !caller.is_gateway() {
        return Err(denied(format!(
            "{caller} is not a gateway: it may not call on behalf of {claimed:?}"
        )));
    }
    match SpiffeId::parse_cloud(claimed) {
        Ok(id) if id.trust_domain() == caller.trust_domain() => Ok(id),
        Ok(id) => Err(denied(format!(
            "{caller} may not call on behalf of {id}, another trust domain"
        ))),
        Err(e) => Err(Reply::error(
            Status::InvalidArgument,
            format!("on-behalf-of: {e}"),
        )),
    }
}

impl Server {
    /// Writes the reply to a call whose body holds memory: a caller that does not read it within
    /// `limits.call_timeout` has its stream reset, and gives the memory back. A `kept` stream
    /// stays open for the next call. True if the stream is kept (the reply was written, and says
    /// so).
    async fn write_held_reply(
        &self,
        send: &mut quinn::SendStream,
        reply: Reply,
        kept: bool,
    ) -> bool {
        let (framed, kept) = encoded_reply(&reply, kept);
        drop(reply);
        let write = async {
            if kept {
                framed.write(send).await
            } else {
                write_encoded(send, framed).await
            }
        };
        let limit = self.limits.call_timeout;
        match crate::clock::bounded(|| tokio::time::Instant::now() + limit, write).await {
            Some(Ok(())) => kept,
            Some(Err(e)) => {
                debug!("could not write a reply: {e}");
                false
            }
            None => {
                debug!("a caller did not read its reply in time: its stream is reset");
                let _ = send.reset(0u32.into());
                false
            }
        }
    }
}

/// A reply's head and body, encoded as frames; the head says the stream is kept for the next call
/// when `keep` (and the second value whether it does). Not in `write_held_reply`'s body: the head has
/// room for every metadata entry, and held across the write it would make every call's future that
/// much larger.
fn encoded_reply(reply: &Reply, keep: bool) -> (crate::wire::Framed, bool) {
    let mut head = ResponseHead::new(reply.status, &reply.message);
    if let Some(leaf) = &reply.leaf {
        let _ = head.metadata.push((crate::call::LEAF_METADATA, leaf));
    }
    crate::wire::encode_head_keeping(&mut head, keep, reply.body.clone())
}

/// The node's budget for request bodies from peers, in bytes (at most what a semaphore holds).
fn limits_bodies(limits: &Limits) -> usize {
    limits
        .max_buffered_bytes
        .min(tokio::sync::Semaphore::MAX_PERMITS)
}
