//! Traffic policy in the call path: a thin shell around the decisions of `mesh-core`.
//!
//! At the caller, per call: route match and weighted split (canary, rollout, geography), an
//! endpoint picked by power of two choices over peak-EWMA in the caller's zone first, skipping
//! ejected and full endpoints; the deadline; retries for idempotent methods on retryable statuses
//! within the retry budget, with back-off, on another endpoint when there is one; the circuit
//! breaker fed with every outcome; a mirrored copy of a share of calls, whose answer is dropped.
//!
//! At the callee: authorization (enforced or audited) and per-caller rate limits.
//!
//! Every decision is counted per rule (`allowed`, `denied`, `audited`, `mirrored`, `retried`,
//! `ejected`, `rate_limited`) and joins the node's telemetry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::authz::glob;
use mesh_core::balance::{BalanceConfig, Balancer, Outcome};
use mesh_core::limits::{RetryBudget, TokenBucket};
use mesh_core::route::{self, Subset, in_subset};
use mesh_core::{MethodName, ServiceName, SpiffeId};
use mesh_proto::{RequestHead, Status, TraceContext};
use tracing::{debug, warn};

use crate::call::{CallContext, Reply};
use crate::node::{CallOptions, Inner, Node, lock, random};
use crate::policy::Policy;

/// Per-service balancer state, retry budgets and callee rate-limit buckets.
#[derive(Default)]
pub(crate) struct Traffic {
    balancers: HashMap<String, Balancer<u64>>,
    budgets: HashMap<String, RetryBudget>,
    /// Rate-limit buckets: per limit, per caller.
    buckets: HashMap<String, HashMap<SpiffeId, TokenBucket>>,
    /// Remembered admissions, by a hash of (policy version, caller, service, method).
    verdicts: HashMap<u64, (u64, SpiffeId, ServiceName, MethodName, Arc<Admission>)>,
}

/// What the policy says of one (caller, service, method).
pub(crate) struct Admission {
    verdict: mesh_core::authz::Verdict,
    /// Index of the rate limit that applies, in the policy's list.
    rate_limit: Option<usize>,
}

/// Whether a status counts against an endpoint's health.
fn is_failure(status: Status) -> bool {
    match status {
        Status::Unavailable | Status::Internal | Status::DeadlineExceeded => true,
        Status::Upstream(code) => code >= 500,
        _ => false,
    }
}

/// Whether a call that failed so may be tried again (if its method is idempotent).
fn is_retryable(status: Status) -> bool {
    match status {
        Status::Unavailable => true,
        Status::Upstream(code) => matches!(code, 502..=504),
        _ => false,
    }
}

impl Node {
    /// A call to a service hosted elsewhere, under `policy` (read once per call by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn call_remote(
        &self,
        service: &str,
        method: &str,
        body: Bytes,
        options: &CallOptions,
        trace: TraceContext,
        deadline: Instant,
        policy: Option<Arc<Policy>>,
    ) -> (Reply, String) {
        let svc = policy.as_ref().and_then(|p| p.service(service));
        let decision = route::decide(
            svc.map_or(&[][..], |s| &s.routes[..]),
            method,
            &options.metadata,
            &self.inner.id_text,
            &self.inner.labels,
            random(),
            random(),
        );
        let rule = decision.route.map_or(service, |r| r.name.as_str());
        let deadline = match (options.timeout, decision.route.and_then(|r| r.timeout)) {
            (None, Some(t)) => Instant::now() + t,
            _ => deadline,
        };
        let default_balance = BalanceConfig::default();
        let balance = svc.map_or(&default_balance, |s| &s.balance);
        let idempotent = svc.is_some_and(|s| s.idempotent.iter().any(|g| glob(g, method)));
        let retry = svc.and_then(|s| s.retry.as_ref()).filter(|_| idempotent);
        if let Some(r) = retry {
            let mut traffic = lock(&self.inner.traffic);
            if !traffic.budgets.contains_key(service) {
                traffic
                    .budgets
                    .insert(service.to_owned(), RetryBudget::new(r.budget, 10.0));
            }
            if let Some(budget) = traffic.budgets.get_mut(service) {
                budget.deposit();
            }
        }
        if let Some(mirror) = decision.mirror {
            self.mirror(
                service,
                method,
                &body,
                options,
                mirror.clone(),
                deadline,
                balance,
                rule,
            );
        }

        let mut tried: Vec<u64> = Vec::new();
        let mut attempt = 1;
        loop {
            let (conn, key, callee) = match self.pick(service, &decision.subset, &tried, balance) {
                Ok(found) => found,
                Err(reply) => return (reply, String::new()),
            };
            let started = Instant::now();
            let left = deadline.saturating_duration_since(started);
            let reply = match self.head(service, method, options, trace, left) {
                Err(reply) => reply,
                Ok(head) => {
                    match tokio::time::timeout(left, self.remote_call(conn, head, body.clone()))
                        .await
                    {
                        Ok(reply) => reply,
                        Err(_) => Reply::error(
                            Status::DeadlineExceeded,
                            format!("no answer from {service} within the deadline"),
                        ),
                    }
                }
            };
            self.finish(
                service,
                key,
                &callee,
                started.elapsed(),
                is_failure(reply.status),
                rule,
            );
            let Some(r) = retry else {
                return (reply, callee);
            };
            if !is_retryable(reply.status) || attempt >= r.attempts {
                return (reply, callee);
            }
            let backoff = r.backoff.saturating_mul(1 << (attempt - 1).min(10));
            if Instant::now() + backoff >= deadline {
                return (reply, callee);
            }
            let allowed = lock(&self.inner.traffic)
                .budgets
                .get_mut(service)
                .is_some_and(RetryBudget::withdraw);
            if !allowed {
                debug!("retry budget of {service} spent; not retrying");
                return (reply, callee);
            }
            self.count(rule, "retried");
            tried.push(key);
            attempt += 1;
            tokio::time::sleep(backoff).await;
        }
    }

    fn head<'a>(
        &self,
        service: &'a str,
        method: &'a str,
        options: &'a CallOptions,
        trace: TraceContext,
        left: Duration,
    ) -> Result<RequestHead<'a>, Reply> {
        let mut head = RequestHead::new(
            service,
            method,
            u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1),
        );
        head.trace = Some(trace);
        for (k, v) in &options.metadata {
            if head.metadata.push((k, v)).is_err() {
                let why = format!(
                    "more than {} metadata entries",
                    mesh_proto::limits::MAX_METADATA
                );
                return Err(Reply::error(Status::InvalidArgument, why));
            }
        }
        Ok(head)
    }

    /// Picks the endpoint of `service` in `subset` for the next attempt, avoiding those `tried`
    /// while others remain: its connection, its balancer key and its node name.
    fn pick(
        &self,
        service: &str,
        subset: &Subset,
        tried: &[u64],
        balance: &BalanceConfig,
    ) -> Result<(quinn::Connection, u64, String), Reply> {
        let peers = lock(&self.inner.peers);
        let endpoints = peers.table.endpoints(service);
        let all: Vec<(u64, Option<&str>)> = endpoints
            .iter()
            .filter_map(|id| {
                let entry = peers.by_id.get(id)?;
                in_subset(subset, &entry.info.labels)
                    .then(|| (entry.key, entry.info.labels.get("zone").map(String::as_str)))
            })
            .collect();
        if all.is_empty() {
            return Err(if endpoints.is_empty() {
                self.no_endpoint(&peers, service)
            } else {
                Reply::error(
                    Status::Unavailable,
                    format!(
                        "no live endpoint of service {service} matches the route's subset {subset:?}"
                    ),
                )
            });
        }
        let fresh: Vec<(u64, Option<&str>)> = all
            .iter()
            .copied()
            .filter(|(k, _)| !tried.contains(k))
            .collect();
        let candidates = if fresh.is_empty() { &all } else { &fresh };
        let zone = self.inner.labels.get("zone").map(String::as_str);
        let mut traffic = lock(&self.inner.traffic);
        if !traffic.balancers.contains_key(service) {
            traffic
                .balancers
                .insert(service.to_owned(), Balancer::new(balance.clone()));
        }
        let balancer = traffic
            .balancers
            .get_mut(service)
            .ok_or_else(|| Reply::error(Status::Internal, "balancer vanished"))?;
        balancer.set_config(balance);
        let chosen = balancer
            .pick(candidates, zone, Instant::now(), random(), random())
            .ok_or_else(|| {
                Reply::error(
                    Status::Unavailable,
                    format!("every endpoint of service {service} is ejected or at its limit of calls in flight"),
                )
            })?;
        drop(traffic);
        let gone = || {
            Reply::error(
                Status::Unavailable,
                format!("an endpoint of {service} just left"),
            )
        };
        let entry = endpoints
            .iter()
            .filter_map(|id| peers.by_id.get(id))
            .find(|e| e.key == chosen)
            .ok_or_else(gone)?;
        let conn = entry.conns.first().cloned().ok_or_else(gone)?;
        Ok((conn, chosen, entry.info.id.node_name().as_str().to_owned()))
    }

    fn finish(
        &self,
        service: &str,
        key: u64,
        callee: &str,
        latency: Duration,
        failed: bool,
        rule: &str,
    ) {
        let outcome = lock(&self.inner.traffic)
            .balancers
            .get_mut(service)
            .map_or(Outcome::None, |b| {
                b.finish(&key, latency, !failed, Instant::now())
            });
        match outcome {
            Outcome::Ejected(until) => {
                warn!(
                    "ejected {callee} from service {service} for {:?} after failures",
                    until.saturating_duration_since(Instant::now())
                );
                self.count(rule, "ejected");
            }
            Outcome::Restored => debug!("{callee} is back in service {service}"),
            Outcome::None => {}
        }
    }

    /// Copies a call to an endpoint of `subset`, in the background; its answer is discarded and
    /// its slowness or failure never reaches the caller.
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        &self,
        service: &str,
        method: &str,
        body: &Bytes,
        options: &CallOptions,
        subset: Subset,
        deadline: Instant,
        balance: &BalanceConfig,
        rule: &str,
    ) {
        let Ok((conn, key, _)) = self.pick(service, &subset, &[], balance) else {
            return;
        };
        self.count(rule, "mirrored");
        let node = self.clone();
        let (service, method, body, options) = (
            service.to_owned(),
            method.to_owned(),
            body.clone(),
            options.clone(),
        );
        let trace = TraceContext {
            trace_id: [0; 16],
            span_id: random().to_le_bytes(),
            flags: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = match node.head(&service, &method, &options, trace, left) {
                Ok(head) => tokio::time::timeout(left, node.remote_call(conn, head, body))
                    .await
                    .ok(),
                Err(_) => None,
            };
            // The mirror's answer is dropped, but its endpoint's health and latency still count.
            let failed = reply.as_ref().is_none_or(|r| is_failure(r.status));
            if let Some(b) = lock(&node.inner.traffic).balancers.get_mut(&service) {
                b.finish(&key, started.elapsed(), !failed, Instant::now());
            }
        });
    }

    pub(crate) fn current_policy(&self) -> Option<Arc<Policy>> {
        lock(&self.inner.policy).as_ref().map(|(_, p)| p.clone())
    }

    pub(crate) fn count(&self, rule: &str, action: &'static str) {
        lock(&self.inner.telemetry).record_rule(rule, action);
    }

    /// Replaces the policy this node runs under (normally done by the gateway's control stream).
    pub fn set_policy(&self, version: u64, policy: Policy) {
        *lock(&self.inner.policy) = Some((version, Arc::new(policy)));
    }

    /// Drops the policy: the node runs as if it never had one.
    pub fn clear_policy(&self) {
        *lock(&self.inner.policy) = None;
    }

    /// Retries and calls made under the retry budget of `service`: `(calls, retries)`.
    pub fn retry_totals(&self, service: &str) -> (u64, u64) {
        lock(&self.inner.traffic)
            .budgets
            .get(service)
            .map_or((0, 0), RetryBudget::totals)
    }
}

impl Inner {
    /// Authorization and rate limits at the callee; `Err` is the refusal to send back.
    pub(crate) fn admit(
        &self,
        ctx: &CallContext,
        caller_labels: impl FnOnce() -> BTreeMap<String, String>,
    ) -> Result<(), Reply> {
        let Some((version, policy)) = lock(&self.policy).as_ref().map(|(v, p)| (*v, p.clone()))
        else {
            return Ok(());
        };
        let (service, method) = (ctx.service.as_str(), ctx.method.as_str());
        let admission = self.admission(version, &policy, ctx, caller_labels);
        let verdict = &admission.verdict;
        if verdict.denied {
            let action = if verdict.allow { "audited" } else { "denied" };
            lock(&self.telemetry).record_rule(&verdict.rule, action);
            let caller = ctx.caller.to_string();
            self.audit_event(
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
            lock(&self.telemetry).record_rule(&verdict.rule, "allowed");
        }
        if let Some(limit) = admission.rate_limit.and_then(|i| policy.rate_limits.get(i)) {
            let now = Instant::now();
            let mut traffic = lock(&self.traffic);
            if !traffic.buckets.contains_key(&limit.name) {
                traffic.buckets.insert(limit.name.clone(), HashMap::new());
            }
            let Some(buckets) = traffic.buckets.get_mut(&limit.name) else {
                return Ok(());
            };
            if !buckets.contains_key(&ctx.caller) {
                buckets.insert(
                    ctx.caller.clone(),
                    TokenBucket::new(limit.per_second, limit.burst, now),
                );
            }
            let allowed = buckets.get_mut(&ctx.caller).is_some_and(|b| b.take(now));
            drop(traffic);
            if !allowed {
                lock(&self.telemetry).record_rule(&limit.name, "rate_limited");
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

    /// What the policy says of this caller, service and method under policy `version`: the
    /// authorization verdict and the rate limit that applies. Remembered, so that a 50-rule policy
    /// costs one lookup per call, not 50 glob matches; forgotten when a peer (re)connects, since
    /// its labels may have changed.
    fn admission(
        &self,
        version: u64,
        policy: &Policy,
        ctx: &CallContext,
        caller_labels: impl FnOnce() -> BTreeMap<String, String>,
    ) -> Arc<Admission> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            version,
            &ctx.caller,
            ctx.service.as_str(),
            ctx.method.as_str(),
        )
            .hash(&mut h);
        let key = h.finish();
        let traffic = lock(&self.traffic);
        if let Some((v, caller, service, method, admission)) = traffic.verdicts.get(&key)
            && *v == version
            && *caller == ctx.caller
            && *service == ctx.service
            && *method == ctx.method
        {
            return admission.clone();
        }
        drop(traffic);
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
        let mut traffic = lock(&self.traffic);
        if traffic.verdicts.len() >= 4096 {
            traffic.verdicts.clear();
        }
        traffic.verdicts.insert(
            key,
            (
                version,
                ctx.caller.clone(),
                ctx.service.clone(),
                ctx.method.clone(),
                admission.clone(),
            ),
        );
        admission
    }

    /// Forgets remembered verdicts (a peer's labels may have changed).
    pub(crate) fn forget_verdicts(&self) {
        lock(&self.traffic).verdicts.clear();
    }
}
