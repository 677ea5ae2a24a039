//! The per-worker engine: everything the filter decides for a request, as plain Rust.
//!
//! The wasm adapter calls [`Worker::on_request`] with the request's view, the time and the shared store, and gets back
//! either a local reply (429) or the ordered upstream list for `x-equilibrio-upstream`; then [`Worker::on_response`]
//! (sticky cookie, passive health) and [`Worker::on_done`] (latency, in-flight, aggregates). Nothing here calls the
//! host, so the whole request path is tested natively against [`crate::shared::MemoryStore`].
//!
//! Order of decisions: rate limit, then sticky pin (if valid and the endpoint keeps sessions), then the algorithm over
//! the candidates (healthy, weight above 0, not ejected; if every such endpoint is ejected the ejections are ignored,
//! like Envoy's panic threshold), then up to two distinct retry hosts. Each decision's logic is in its own module
//! ([`crate::ratelimit`], [`crate::sticky`], [`crate::selector`], [`crate::outlier`], [`crate::inflight`]); this one
//! holds the worker's state and the order.

use crate::balancer::ring::hash_key;
use crate::balancer::{MAX_UPSTREAMS, fill_retries};
use crate::config::{KeySource, ParsedConfig};
use crate::inflight::{Held, InFlight};
use crate::outlier::{Breaker, Ejections, Outcome, Streak};
use crate::ratelimit::{self, Decision};
use crate::report::{Aggregate, GlobalStats};
use crate::request::client_of;
use crate::routing::{self, Routes};
use crate::sampling::Sampler;
use crate::selector::Selector;
use crate::shared::{self, SharedStore, keys};
use crate::snapshot::{Snapshot, remap};
use crate::sticky;
use crate::table::Table;
use std::collections::HashMap;
use std::rc::Rc;

pub use crate::request::RequestView;

/// A reply the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// The time of one request's headers, read from the host at most once, and only if something needs it.
struct LazyNow<'a> {
    clock: &'a dyn Fn() -> u64,
    read: std::cell::Cell<Option<u64>>,
}

impl LazyNow<'_> {
    fn get(&self) -> u64 {
        match self.read.get() {
            Some(t) => t,
            None => {
                let t = (self.clock)();
                self.read.set(Some(t));
                t
            }
        }
    }

    /// The time if it was read, else `recent` (the last time read).
    fn recent(&self, recent: u64) -> u64 {
        self.read.get().unwrap_or(recent)
    }

    fn was_read(&self) -> bool {
        self.read.get().is_some()
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Verdict {
    /// Forward with this `x-equilibrio-upstream` value (empty: remove the header, the proxy's fallback decides).
    Forward(Pending),
    Reply(LocalReply),
}

/// The state a request carries from its headers to its end.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    pub upstreams: String,
    /// The snapshot the request was balanced on (the worker may switch tables before it ends).
    snap: Option<Rc<Snapshot>>,
    /// Indices into `snap`, in listed order.
    listed: Vec<usize>,
    start_ms: u64,
    /// The in-flight count this request holds (on an endpoint of `snap`).
    inflight: Option<Held>,
    /// The endpoint the client's valid cookie named, and the cookie's expiry.
    pinned: Option<(String, u64)>,
    /// The client's cookie pins the endpoint the request goes to first and needs no renewal: unless an attempt
    /// fails over to another host, its response gets no cookie.
    settled: bool,
    /// The response was seen (`on_response` ran), and when: an observed request's latency is measured to it.
    pub responded: bool,
    responded_ms: u64,
    status: u32,
    served: Option<usize>,
    /// The weight of this request's observation (see [`crate::sampling`]); 0: its outcome is not read.
    weight: u32,
    /// The half-open endpoint this request is a trial for (its primary), by id.
    trial: Option<String>,
    /// The route the request took (an index into the worker's routes).
    route: Option<usize>,
}

impl Pending {
    /// Whether the adapter must call [`Worker::on_response`] at the response headers (to add a cookie): the request's
    /// policy (its route's) has sticky sessions, and its session is new or due a renewal, or the request is observed
    /// (then a fail-over to another host re-pins the client at once). A settled session's unobserved request reads
    /// nothing of its response: should its endpoint fail, the observed requests eject it, and the client is re-pinned
    /// then.
    pub fn needs_response_headers(&self) -> bool {
        self.snap.as_ref().is_some_and(|s| s.codec.is_some()) && (!self.settled || self.observed())
    }

    /// Whether the adapter reads this request's outcome (status, answering host, end time) at its end.
    pub fn observed(&self) -> bool {
        self.weight > 0
    }

    /// When the request started: the time an unobserved request's response is handled at (its cookie's renewal,
    /// its passive-health outcome), which spares the adapter a clock read.
    pub fn started_ms(&self) -> u64 {
        self.start_ms
    }

    fn id(&self, i: usize) -> Option<&str> {
        self.snap.as_ref()?.endpoint(i).map(|e| e.id.as_str())
    }
}

/// What the proxy tells about the response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseInfo<'a> {
    pub status: u32,
    /// The address of the host that answered (or failed last), if any.
    pub upstream_address: Option<&'a str>,
    /// The proxy saw a connect failure or reset rather than an answer.
    pub gateway_failure: bool,
}

/// What a worker keeps per endpoint of its current snapshot, carried over by id when the table changes.
#[derive(Debug, Clone, Default)]
struct EndpointLocal {
    /// Outcomes in a row, toward an ejection.
    streak: Streak,
    /// Counts not yet merged into the shared aggregates (merged before a table change, so they start empty).
    aggregate: Aggregate,
}

pub struct Worker {
    base: ParsedConfig,
    snap: Rc<Snapshot>,
    seq: u64,
    selector: Selector,
    /// The policy's routes, and for each its snapshot (its pool, its policy) and its selector's state.
    routes: Routes,
    route_names: Vec<String>,
    route_snaps: Vec<Rc<Snapshot>>,
    route_selectors: Vec<Selector>,
    /// Indexed like `snap`'s endpoints.
    endpoints: Vec<EndpointLocal>,
    inflight: InFlight,
    stats: GlobalStats,
    rng: fastrand::Rng,
    sampler: Sampler,
    /// The last time read (unix ms): what needs only a recent time uses it instead of reading the clock.
    last_ms: u64,
    /// Rate-limit tokens taken ahead for busy keys.
    leases: ratelimit::Leases,
    ejections: Option<(u32, Ejections)>,
    logs: Vec<String>,
}

impl Worker {
    /// A worker on the static configuration (and its static endpoints, if any). `seed` feeds the random choices.
    pub fn new(base: ParsedConfig, seed: u64) -> Worker {
        let zone = base.config.zone.as_deref();
        let snap = Rc::new(Snapshot::build(base.config.static_table(), base.config.policy.clone(), zone));
        let mut worker = Worker {
            base,
            selector: Selector::new(&snap),
            routes: Routes::default(),
            route_names: Vec::new(),
            route_snaps: Vec::new(),
            route_selectors: Vec::new(),
            endpoints: vec![EndpointLocal::default(); snap.endpoints().len()],
            snap,
            seq: 0,
            inflight: InFlight::default(),
            stats: GlobalStats::default(),
            rng: fastrand::Rng::with_seed(seed),
            sampler: Sampler::default(),
            last_ms: 0,
            leases: ratelimit::Leases::default(),
            ejections: None,
            logs: Vec::new(),
        };
        worker.build_routes(None);
        worker
    }

    /// The routes' snapshots and selectors for the current snapshot; a route's selector state is carried over by name
    /// (`mapping`: the endpoints' indices in the previous snapshot).
    fn build_routes(&mut self, mapping: Option<&[Option<usize>]>) {
        let service = &self.snap.policy;
        self.routes = Routes::compile(&service.routes);
        let mut old: HashMap<String, Selector> =
            std::mem::take(&mut self.route_names).into_iter().zip(std::mem::take(&mut self.route_selectors)).collect();
        self.route_snaps = service
            .routes
            .iter()
            .map(|r| {
                let pool = routing::pool(self.snap.endpoints(), &r.pool);
                Rc::new(self.snap.with_policy(routing::policy(service, r), pool))
            })
            .collect();
        self.route_names = service.routes.iter().map(|r| r.name.clone()).collect();
        self.route_selectors = self
            .route_names
            .iter()
            .zip(&self.route_snaps)
            .map(|(name, snap)| match (old.remove(name), mapping) {
                (Some(selector), Some(mapping)) => selector.rebuild(snap, mapping),
                _ => Selector::new(snap),
            })
            .collect();
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// Log lines produced since the last call (ejections, table switches).
    pub fn take_logs(&mut self) -> Vec<String> {
        std::mem::take(&mut self.logs)
    }

    /// Runs on the worker's tick (and on requests until the first table arrives): picks up the ejections other workers
    /// made and the table the poller published, if it changed. Two small shared reads when nothing changed.
    pub fn refresh<S: SharedStore + ?Sized>(&mut self, store: &S) {
        self.load_ejections(store);
        let seq = store.get(keys::TABLE_SEQ).map(|(v, _)| shared::decode_i64(&v) as u64).unwrap_or(0);
        if seq == 0 || seq == self.seq {
            return;
        }
        let Some((bytes, _)) = store.get(keys::TABLE) else {
            return;
        };
        let Ok(table) = serde_json::from_slice::<Table>(&bytes) else {
            // the poller only publishes validated tables; keep ours and do not retry this sequence
            self.seq = seq;
            self.logs.push(format!("published table {seq} does not parse; keeping table {}", self.snap.table.version));
            return;
        };
        let policy = match &table.policy {
            Some(policy) => match crate::config::Config::with_policy(&self.base.source, policy) {
                Ok(config) => config.policy,
                Err(e) => {
                    self.logs.push(format!("published policy refused ({e}); using the static policy"));
                    self.base.config.policy.clone()
                }
            },
            None => self.base.config.policy.clone(),
        };
        self.flush(store);
        let snap = Rc::new(Snapshot::build(table, policy, self.base.config.zone.as_deref()));
        let mapping = snap.mapping_from(&self.snap);
        self.selector = self.selector.rebuild(&snap, &mapping);
        self.endpoints = remap(&self.endpoints, &mapping)
            .into_iter()
            .map(|e| EndpointLocal { streak: e.streak, aggregate: Aggregate::default() })
            .collect();
        self.snap = snap;
        self.seq = seq;
        self.build_routes(Some(&mapping));
    }

    /// Re-reads the shared ejections (parsing them again only when they changed).
    fn load_ejections<S: SharedStore + ?Sized>(&mut self, store: &S) {
        if !self.snap.policy.passive_health.enabled {
            self.ejections = None;
            return;
        }
        match store.get(keys::EJECTIONS) {
            None => self.ejections = None,
            Some((bytes, cas)) => {
                if self.ejections.as_ref().is_none_or(|(c, _)| *c != cas) {
                    self.ejections = Some((cas, Ejections::decode(&bytes)));
                }
            }
        }
    }

    /// A request's headers at time `now_ms`: where it goes, or the local reply.
    pub fn on_request<S: SharedStore + ?Sized>(&mut self, req: &dyn RequestView, now_ms: u64, store: &S) -> Verdict {
        self.on_request_at(req, &|| now_ms, store)
    }

    /// [`Worker::on_request`] with the time read only if the request needs it (`clock`: the host's clock, read at most
    /// once): rate limiting, sticky cookies, ejections and an observed request's start do; the rest (the sampler's
    /// per-second budget, the balancers' decay and cache ages) uses the last time read, which observed requests keep
    /// within about a millisecond under load (and every request is observed below the sampling rate).
    pub fn on_request_at<S: SharedStore + ?Sized>(
        &mut self,
        req: &dyn RequestView,
        clock: &dyn Fn() -> u64,
        store: &S,
    ) -> Verdict {
        let now = LazyNow { clock, read: std::cell::Cell::new(None) };
        let verdict = self.decide(req, &now, store);
        if let Some(t) = now.read.get() {
            self.observe_time(t);
        }
        verdict
    }

    /// The last time read: ticks and observed requests keep it fresh.
    pub fn observe_time(&mut self, now_ms: u64) {
        self.last_ms = self.last_ms.max(now_ms);
    }

    fn decide<S: SharedStore + ?Sized>(&mut self, req: &dyn RequestView, now: &LazyNow<'_>, store: &S) -> Verdict {
        let recent_ms = self.last_ms;
        if self.seq == 0 {
            // no table yet: look on every request until the first one arrives (afterwards the tick refreshes)
            self.refresh(store);
        }
        // the route, if the policy has routes: its snapshot holds its pool and its policy
        let route = self.routes.pick(req);
        let snap = match route.and_then(|r| self.route_snaps.get(r)) {
            Some(route_snap) => route_snap.clone(),
            None => self.snap.clone(),
        };
        if snap.policy.rate_limiting.enabled
            && let Some(reply) = self.rate_limit(&snap, route, req, now.get(), store)
        {
            return Verdict::Reply(reply);
        }

        // the common case (nothing ejected) borrows the snapshot's candidate list: no work per request
        let ejections =
            self.ejections.as_ref().map(|(_, e)| e).filter(|e| !e.entries.is_empty() && e.active(now.get()) > 0);
        let ejected: Vec<bool> = match ejections {
            Some(ej) => snap.endpoints().iter().map(|e| ej.is_ejected(&e.id, now.get())).collect(),
            None => Vec::new(),
        };
        let is_ejected = |i: usize| ejected.get(i).copied().unwrap_or(false);
        let mut candidates: std::borrow::Cow<'_, [usize]> = if ejected.is_empty() {
            std::borrow::Cow::Borrowed(&snap.new_session_candidates)
        } else {
            std::borrow::Cow::Owned(snap.new_session_candidates.iter().copied().filter(|&i| !is_ejected(i)).collect())
        };
        if candidates.is_empty() {
            // panic mode: every endpoint that may take traffic is ejected; passive health must not empty the pool
            candidates = std::borrow::Cow::Borrowed(&snap.new_session_candidates);
        }

        let mut pending = Pending { start_ms: recent_ms, snap: Some(snap.clone()), route, ..Pending::default() };
        let mut order: Vec<usize> = Vec::with_capacity(MAX_UPSTREAMS);

        // a half-open endpoint due a trial gets this request first (the retries still go elsewhere)
        if !ejected.is_empty()
            && let Some(i) = self.take_trial(&snap, store, now.get())
        {
            pending.trial = snap.endpoint(i).map(|e| e.id.clone());
            order.push(i);
        }

        if let Some(codec) = &snap.codec
            && order.is_empty()
        {
            let name = &snap.policy.sticky_sessions.cookie_name;
            let pin = sticky::resolve(codec, req.header("cookie").as_deref(), name, now.get() / 1000);
            if pin.invalid {
                self.stats.sticky_invalid += 1;
            }
            pending.pinned = pin.pinned;
            if let Some((id, _)) = &pending.pinned
                && let Some(&i) = snap.by_id.get(id)
                && snap.keeps_sessions(i)
                && !is_ejected(i)
            {
                self.stats.sticky_hits += 1;
                order.push(i);
            }
        }

        let selector = match route.and_then(|r| self.route_selectors.get_mut(r)) {
            Some(selector) => selector,
            None => &mut self.selector,
        };
        if order.is_empty() {
            // locality: the zone this request balances in (the plan is the snapshot's while nothing is ejected)
            let replanned;
            let plan = if ejected.is_empty() {
                snap.zone_plan.as_ref()
            } else {
                replanned = snap.zone_plan_over(&candidates);
                replanned.as_ref()
            };
            let in_zone = match plan {
                Some(plan) => plan.candidates(selector.zone_draw(&snap, req, &mut self.rng)),
                None => &candidates[..],
            };
            let inflight = |i: usize| snap.inflight_keys.get(i).map_or(0, |k| shared::get_i64(store, k));
            order = selector.pick(&snap, req, in_zone, inflight, now.recent(recent_ms), &mut self.rng);
            // one retry in the same zone, then one outside it: a zone that fails as a whole costs no request
            if plan.is_some() {
                fill_retries(&mut order, in_zone, MAX_UPSTREAMS - 1);
                let outside: Vec<usize> = candidates.iter().copied().filter(|i| !in_zone.contains(i)).collect();
                fill_retries(&mut order, &outside, MAX_UPSTREAMS);
            }
        }
        fill_retries(&mut order, &candidates, MAX_UPSTREAMS);

        if order.is_empty() {
            self.stats.no_upstream += 1;
            // a route's pool is not to be left for whatever the proxy would pick instead
            if snap.pool.is_some() {
                return Verdict::Reply(no_endpoint_reply(route.and_then(|r| self.route_names.get(r))));
            }
        }
        // the concurrency limit: the first listed endpoint with room holds the request, the full ones before it are
        // passed over; none with room: 503
        let limit = snap.policy.circuit_breaker.max_requests_per_endpoint;
        if limit > 0 && !order.is_empty() {
            let room = order.iter().enumerate().find_map(|(k, &i)| {
                let id = snap.endpoint(i)?.id.as_str();
                self.inflight.acquire_below(store, i, id, limit).map(|held| (k, held))
            });
            match room {
                Some((k, held)) => {
                    if k > 0 {
                        self.stats.overflowed += 1;
                        order.drain(..k);
                    }
                    pending.inflight = Some(held);
                }
                None => {
                    self.stats.overloaded += 1;
                    return Verdict::Reply(overloaded_reply());
                }
            }
        }
        let mut header = String::with_capacity(order.len() * 22);
        for &i in &order {
            if let Some(e) = snap.endpoint(i) {
                if !header.is_empty() {
                    header.push(',');
                }
                header.push_str(&e.address);
                pending.listed.push(i);
            }
        }
        pending.upstreams = header;
        if let Some((id, _)) = &pending.pinned {
            let first = pending.listed.first().and_then(|&i| snap.endpoint(i));
            let ttl_ms = snap.policy.sticky_sessions.ttl.0;
            pending.settled = first.is_some_and(|e| e.id == *id)
                && sticky::renewal(pending.pinned.as_ref(), id, now.get(), ttl_ms).is_none();
        }
        if let Some(&primary) = pending.listed.first()
            && pending.inflight.is_none()
        {
            self.acquire_inflight(&mut pending, primary, store);
        }
        // a trial's outcome decides the breaker. (With sticky sessions a new or renewing session's response is read
        // for its cookie whether observed or not: see `Pending::needs_response_headers`.)
        pending.weight = if pending.trial.is_some() {
            1
        } else {
            self.sampler.sample(now.recent(recent_ms), snap.policy.observation.max_per_second, &mut self.rng)
        };
        // an observed request is timed from now; a request that read the clock anyway starts then
        if pending.observed() || now.was_read() {
            pending.start_ms = now.get();
        }
        Verdict::Forward(pending)
    }

    /// Takes a token for the request; the reply if it is over its limit. A route with a limit of its own has its own
    /// buckets.
    fn rate_limit<S: SharedStore + ?Sized>(
        &mut self,
        snap: &Snapshot,
        route: Option<usize>,
        req: &dyn RequestView,
        now_ms: u64,
        store: &S,
    ) -> Option<LocalReply> {
        let hops = snap.policy.rate_limiting.xff_trusted_hops;
        let by_header = match &snap.policy.rate_limiting.key {
            KeySource::Header(name) => req.header(name).map(|v| format!("h:{v}")),
            _ => None,
        };
        let mut key = by_header.unwrap_or_else(|| format!("a:{}", client_of(req, hops)));
        if let Some(r) = route
            && self.snap.policy.routes.get(r).is_some_and(|r| r.rate_limiting.is_some())
            && let Some(name) = self.route_names.get(r)
        {
            key = format!("r:{name}:{key}");
        }
        let (decision, outcome) =
            ratelimit::check(store, &mut self.leases, &snap.limits, hash_key(snap.seed, key.as_bytes()), now_ms);
        if outcome.evicted {
            self.stats.rate_limit_evictions += 1;
        }
        if outcome.contended {
            self.stats.rate_limit_contended += 1;
        }
        match decision {
            Decision::Allowed { .. } => None,
            Decision::Limited { retry_after_s } => {
                self.stats.rate_limited += 1;
                Some(LocalReply {
                    status: 429,
                    headers: ratelimit::limited_headers(&snap.limits, retry_after_s),
                    body: format!(
                        "{{\"error\":{{\"code\":\"rate_limited\",\"message\":\"too many requests\",\"retry_after_seconds\":{retry_after_s}}}}}"
                    ),
                })
            }
        }
    }

    /// Records the response; returns a `Set-Cookie` value when the client must be (re)pinned. Without sticky
    /// sessions the adapter calls it when the request ends, which saves a callback's host calls per request.
    pub fn on_response<S: SharedStore + ?Sized>(
        &mut self,
        p: &mut Pending,
        resp: ResponseInfo<'_>,
        now_ms: u64,
        store: &S,
    ) -> Option<String> {
        p.responded = true;
        p.responded_ms = now_ms;
        p.status = resp.status;
        let snap = p.snap.clone()?;
        let address_of = |i: usize| snap.endpoint(i).map(|e| e.address.as_str());
        let served_pos = resp.upstream_address.and_then(|a| p.listed.iter().position(|&i| address_of(i) == Some(a)));
        // every listed host before the one that answered failed at the connection level (that is all we retry on)
        let failed_before = served_pos.unwrap_or(if resp.gateway_failure { p.listed.len() } else { 0 });
        for k in 0..failed_before {
            if let Some(i) = p.listed.get(k).and_then(|&i| self.current_index(p, i)) {
                self.outcome(p, i, Outcome::GatewayFailure, now_ms, store);
            }
        }
        let served = served_pos.and_then(|k| p.listed.get(k).copied());
        if let Some(i) = served {
            let outcome = if resp.gateway_failure {
                Some(Outcome::GatewayFailure)
            } else if resp.status >= 500 {
                Some(Outcome::ServerError)
            } else if resp.status == 0 {
                // no response and no upstream failure: the client went away; nothing to learn about the endpoint
                None
            } else {
                Some(Outcome::Success)
            };
            if let (Some(outcome), Some(current)) = (outcome, self.current_index(p, i)) {
                self.outcome(p, current, outcome, now_ms, store);
            }
            // move the in-flight count to the host that actually holds the request
            if p.inflight.map(|held| held.index) != Some(i) {
                self.release_inflight(p, store);
                self.acquire_inflight(p, i, store);
            }
        }
        p.served = served;

        let codec = snap.codec.as_ref()?;
        let id = p.id(served?)?;
        if resp.status >= 500 || resp.status == 0 {
            return None;
        }
        let ttl_ms = snap.policy.sticky_sessions.ttl.0;
        let expires = sticky::renewal(p.pinned.as_ref(), id, now_ms, ttl_ms)?;
        Some(sticky::set_cookie(&snap.policy.sticky_sessions, &codec.encode(id, expires)))
    }

    /// The index in the current snapshot of endpoint `i` of the request's snapshot (the same when the table did not
    /// change during the request, which saves a lookup by id).
    fn current_index(&self, p: &Pending, i: usize) -> Option<usize> {
        match &p.snap {
            Some(snap) if Rc::ptr_eq(snap, &self.snap) => Some(i),
            _ => p.id(i).and_then(|id| self.snap.by_id.get(id).copied()),
        }
    }

    /// Takes a trial request for a half-open endpoint that is due one (shared: the trials are counted across
    /// workers). Its index in the current snapshot.
    fn take_trial<S: SharedStore + ?Sized>(&mut self, snap: &Snapshot, store: &S, now_ms: u64) -> Option<usize> {
        let cfg = &self.snap.policy.passive_health;
        let (_, local) = self.ejections.as_ref()?;
        if !local.trial_due(cfg, now_ms) {
            return None;
        }
        // only an endpoint the table still sends this request's new requests to (its route's pool)
        let due = snap.new_session_candidates.iter().copied().find(|&i| {
            snap.endpoint(i).is_some_and(|e| local.breaker(&e.id, cfg, now_ms) == Breaker::HalfOpen { trial: true })
        })?;
        let id = snap.endpoint(due)?.id.clone();
        let taken = shared::update_present(store, keys::EJECTIONS, |cur| {
            let mut ej = Ejections::decode(cur);
            let taken = ej.take_trial(&id, cfg, now_ms);
            (taken.then(|| ej.encode()), (taken, ej))
        });
        match taken {
            Ok((taken, ejections)) => {
                self.ejections = Some((0, ejections));
                taken.then_some(due)
            }
            Err(_) => None,
        }
    }

    /// An outcome of endpoint `i` of the current snapshot: a trial's closes or re-opens the breaker; any other goes to
    /// passive health.
    fn outcome<S: SharedStore + ?Sized>(&mut self, p: &Pending, i: usize, outcome: Outcome, now_ms: u64, store: &S) {
        // the common case (no trial) compares nothing and copies nothing
        let trial = p.trial.as_deref().filter(|t| self.snap.endpoint(i).is_some_and(|e| e.id == *t));
        let Some(id) = trial.map(str::to_string) else {
            self.passive(i, outcome, now_ms, store);
            return;
        };
        let cfg = &self.snap.policy.passive_health;
        let total = self.snap.endpoints().len();
        let success = outcome == Outcome::Success;
        let settled = shared::update_present(store, keys::EJECTIONS, |cur| {
            let mut ej = Ejections::decode(cur);
            let changed = if success { ej.close(&id) } else { ej.eject(&id, total, cfg, now_ms).is_some() };
            (changed.then(|| ej.encode()), (changed, ej))
        });
        if let Ok((true, ejections)) = settled {
            self.ejections = Some((0, ejections));
            if let Some(e) = self.endpoints.get_mut(i) {
                e.streak = Streak::default();
            }
            if success {
                self.logs.push(format!("endpoint {id} recovered: a trial request succeeded"));
            } else {
                self.stats.ejections += 1;
                self.logs.push(format!("ejected endpoint {id} again: its trial request failed ({outcome:?})"));
            }
        }
    }

    /// Records an outcome for endpoint `i` of the current snapshot; ejects it when its streak calls for it. Outcomes of
    /// an endpoint that is out (requests sent before it was ejected) teach nothing.
    fn passive<S: SharedStore + ?Sized>(&mut self, i: usize, outcome: Outcome, now_ms: u64, store: &S) {
        let cfg = &self.snap.policy.passive_health;
        if !cfg.enabled {
            return;
        }
        if let (Some((_, ej)), Some(e)) = (&self.ejections, self.snap.endpoint(i))
            && ej.is_ejected(&e.id, now_ms)
        {
            return;
        }
        let Some(streak) = self.endpoints.get_mut(i).map(|e| &mut e.streak) else { return };
        if !streak.record(outcome, cfg) {
            return;
        }
        *streak = Streak::default();
        let Some(id) = self.snap.endpoint(i).map(|e| e.id.clone()) else { return };
        let total = self.snap.endpoints().len();
        let ejected = shared::update_present(store, keys::EJECTIONS, |cur| {
            let mut ej = Ejections::decode(cur);
            match ej.eject(&id, total, cfg, now_ms) {
                Some(d) => (Some(ej.encode()), Some((d, ej))),
                None => (None, None),
            }
        });
        if let Ok(Some((duration, ejections))) = ejected {
            // this worker stops using it at once; the others on their next tick (cas 0: re-read then)
            self.ejections = Some((0, ejections));
            self.stats.ejections += 1;
            self.logs.push(format!("ejected endpoint {id} for {duration} ms after {outcome:?}"));
        }
    }

    /// Counts the request as in flight on endpoint `i` of the request's snapshot: exact across workers when the
    /// algorithm balances on it (see [`crate::inflight`]).
    fn acquire_inflight<S: SharedStore + ?Sized>(&mut self, p: &mut Pending, i: usize, store: &S) {
        let Some(id) = p.id(i) else { return };
        // the request's own policy (its route's)
        let policy = p.snap.as_ref().map_or(&self.snap.policy, |s| &s.policy);
        let exact = policy.algorithm.balances_on_inflight() || policy.circuit_breaker.max_requests_per_endpoint > 0;
        p.inflight = self.inflight.acquire(store, i, id, exact);
    }

    fn release_inflight<S: SharedStore + ?Sized>(&mut self, p: &mut Pending, store: &S) {
        let Some(held) = p.inflight.take() else { return };
        if let Some(id) = p.id(held.index) {
            self.inflight.release(store, held, id);
        }
    }

    /// The request is over (answered, failed or abandoned). `now_ms` only matters for an observed request whose
    /// response was not recorded: a recorded one is measured to its response (which saves the adapter a clock read).
    pub fn on_done<S: SharedStore + ?Sized>(&mut self, p: &mut Pending, now_ms: u64, store: &S) {
        self.release_inflight(p, store);
        let Some(i) = p.served.or(p.listed.first().copied()).and_then(|i| self.current_index(p, i)) else { return };
        if !p.observed() {
            if let Some(e) = self.endpoints.get_mut(i) {
                e.aggregate.count();
            }
            return;
        }
        let now_ms = if p.responded { p.responded_ms } else { now_ms };
        let latency_ms = now_ms.saturating_sub(p.start_ms);
        let error = p.status == 0 || p.status >= 500;
        if let Some(e) = self.endpoints.get_mut(i) {
            e.aggregate.record(latency_ms.saturating_mul(1000), error, p.weight);
        }
        let route_selector = p.route.filter(|&r| {
            self.route_snaps.get(r).zip(p.snap.as_ref()).is_some_and(|(current, used)| Rc::ptr_eq(current, used))
        });
        match route_selector.and_then(|r| self.route_selectors.get_mut(r)) {
            Some(selector) => selector.observe_latency(i, latency_ms, now_ms),
            None => self.selector.observe_latency(i, latency_ms, now_ms),
        }
    }

    /// Merges this worker's counts into the shared aggregates (on the worker's tick). Counts that could not be merged
    /// (contention, or a key not created yet: see [`crate::counters`]) are kept for the next flush.
    pub fn flush<S: SharedStore + ?Sized>(&mut self, store: &S) {
        self.inflight.publish(store);
        for (i, agg) in self.endpoints.iter_mut().map(|e| &mut e.aggregate).enumerate() {
            if agg.is_empty() {
                continue;
            }
            let Some(key) = self.snap.aggregate_keys.get(i) else {
                continue;
            };
            let local = *agg;
            let merged = shared::update_present(store, key, |cur| {
                let mut total = Aggregate::decode(cur).unwrap_or_default();
                total.merge(&local);
                (Some(total.encode()), ())
            });
            if merged.is_ok() {
                *agg = Aggregate::default();
            }
        }
        if !self.stats.is_empty() {
            let local = self.stats;
            let merged = shared::update_present(store, keys::GLOBAL_STATS, |cur| {
                let mut total = GlobalStats::decode(cur);
                total.merge(&local);
                (Some(total.encode()), ())
            });
            if merged.is_ok() {
                self.stats = GlobalStats::default();
            }
        }
    }
}

/// The answer when a route's pool has no endpoint to take the request.
fn no_endpoint_reply(route: Option<&String>) -> LocalReply {
    let route = route.map_or("", String::as_str);
    LocalReply {
        status: 503,
        headers: vec![("content-type".into(), "application/json".into())],
        body: format!(
            r#"{{"error":{{"code":"no_endpoint","message":"no endpoint of route `{route}` can take the request"}}}}"#
        ),
    }
}

/// The answer when every listed endpoint is at its concurrency limit (`circuit_breaker.max_requests_per_endpoint`).
fn overloaded_reply() -> LocalReply {
    LocalReply {
        status: 503,
        headers: vec![("retry-after".into(), "1".into()), ("content-type".into(), "application/json".into())],
        body: r#"{"error":{"code":"overloaded","message":"every endpoint is at its concurrency limit","retry_after_seconds":1}}"#
            .into(),
    }
}

#[cfg(test)]
mod tests;
