//! The registry in etcd, shared by several supervisors: every change is one transaction over the keys it touched
//! ([`super::layout`]), conditioned on those keys being as this node last saw them (and, for leader-only writes, on
//! the leader key being this node's), and every node follows the prefix with a watch to keep its in-memory model
//! current. A node that starts, or restarts, reads the whole prefix: etcd alone is enough to come back.
//!
//! A value that does not parse (written by a newer version, or by hand) is skipped, counted and logged, and the node
//! keeps what it had for that key.
//!
//! Events travel the same way: each node puts the events it publishes under `<prefix>/events/<node>/`, bound to a
//! lease of ten minutes (they are news, not state), and shows the other nodes' events on its own stream and history
//! ([`EtcdStore::follow_events`]); webhooks get each event once, from the node that published it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

use super::layout::{self, Key};
use crate::config::EtcdConfig;
use crate::events::Event;
use crate::leadership::Leadership;
use crate::registry::Registry;
use crate::store::{Change, PersistError, Store, StoreFuture};

/// How long one call to etcd may take before the change is refused as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

pub struct EtcdStore {
    client: Client,
    prefix: String,
    leadership: Arc<Leadership>,
    /// The mod revision of each key as this node last saw it (written or watched).
    seen: Mutex<HashMap<Key, i64>>,
    /// The registry the watch keeps current (the App's).
    registry: OnceLock<Arc<Mutex<Registry>>>,
    /// Values that did not parse, since the start.
    malformed: std::sync::atomic::AtomicU64,
    /// This node's events, on their way to etcd (one writer keeps their order).
    outbox: tokio::sync::mpsc::Sender<Vec<Event>>,
    /// This node's id: its events' directory.
    node: String,
}

/// How long events stay in etcd for the other nodes to see.
const EVENT_TTL_S: i64 = 600;
/// This node's events waiting to be written; beyond it they are shown here only.
const OUTBOX: usize = 1024;

fn unavailable(e: impl std::fmt::Display) -> PersistError {
    PersistError::Unavailable(e.to_string())
}

/// One attempt's share of [`CALL_TIMEOUT`]: a member that is gone can hold a call until its connection is found dead.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(700);

/// Runs an etcd call within [`CALL_TIMEOUT`], again when it did not reach etcd or did not come back within
/// [`ATTEMPT_TIMEOUT`] (a member that is gone: the client moves on to another). Gets are safe to repeat, and a
/// transaction is conditioned on what this node saw, so one that was taken after all cannot be taken twice: its
/// second run is a conflict.
async fn call<T, F, Fut>(mut f: F) -> Result<T, PersistError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    loop {
        let attempt_end = (tokio::time::Instant::now() + ATTEMPT_TIMEOUT).min(deadline);
        match tokio::time::timeout_at(attempt_end, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if !not_delivered(&e) => return Err(unavailable(e)),
            outcome => {
                if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
                    return Err(match outcome {
                        Ok(Err(e)) => unavailable(e),
                        _ => unavailable(format!("etcd did not answer within {CALL_TIMEOUT:?}")),
                    });
                }
                tracing::debug!("etcd call not answered; trying again, maybe on another member");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether an error means the call never reached etcd (a connection that failed or broke).
fn not_delivered(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

impl EtcdStore {
    /// Connects to etcd (a member that answers within a few seconds). `node` names this node's events.
    pub async fn connect(
        config: &EtcdConfig,
        node: &str,
        leadership: Arc<Leadership>,
    ) -> Result<EtcdStore, PersistError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &config.tls {
            let mut t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        let client = Client::connect(&config.endpoints, Some(options)).await.map_err(unavailable)?;
        let (outbox, pending) = tokio::sync::mpsc::channel(OUTBOX);
        tokio::spawn(write_events(client.clone(), format!("{}{node}/", layout::events_dir(&config.prefix)), pending));
        Ok(EtcdStore {
            outbox,
            node: node.to_string(),
            client,
            prefix: config.prefix.clone(),
            leadership,
            seen: Mutex::default(),
            registry: OnceLock::new(),
            malformed: Default::default(),
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<Key, i64>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many values read from etcd did not parse.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts and logs a value read from etcd that does not parse (`key`: its etcd key).
    fn refused(&self, key: &str, why: &str) {
        self.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%key, reason = %why, "etcd value refused; keeping what this node had");
    }

    /// Reads the whole registry: `None` when etcd holds none yet (a new deployment). Also the revision it was read at.
    pub async fn load(&self) -> Result<(Option<Registry>, i64), PersistError> {
        let dir = layout::registry_dir(&self.prefix);
        let answer = call(|| {
            let (mut client, dir) = (self.client.clone(), dir.clone());
            async move { client.get(dir, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        if answer.kvs().is_empty() {
            return Ok((None, revision));
        }
        let mut entries: Vec<(Key, Vec<u8>, i64)> = answer
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = Key::parse(&self.prefix, std::str::from_utf8(kv.key()).ok()?)?;
                Some((key, kv.value().to_vec(), kv.mod_revision()))
            })
            .collect();
        // services before their instances
        entries.sort_by_key(|(k, _, _)| matches!(k, Key::Instance(..)));
        let mut registry = Registry::default();
        let mut seen = self.seen();
        for (key, value, revision) in entries {
            match layout::apply(&mut registry, &key, Some(&value)) {
                Ok(()) => {
                    seen.insert(key, revision);
                }
                Err(why) => self.refused(&key.path(&self.prefix), &why),
            }
        }
        Ok((Some(registry), revision))
    }

    /// Keeps the registry current from etcd's history after `revision`, for as long as the process runs. A broken
    /// watch (etcd restarted, history compacted) reads the whole prefix again and watches on from there.
    pub async fn follow(self: Arc<Self>, mut revision: i64) {
        loop {
            match self.watch_from(revision).await {
                Ok(r) => revision = r,
                Err(e) => tracing::warn!(error = %e, "watching etcd failed; reading the registry again"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            match self.reload().await {
                Ok(r) => revision = r,
                Err(e) => tracing::warn!(error = %e, "etcd unreachable; serving the last registry"),
            }
        }
    }

    /// Watches from `revision` + 1 until the stream ends; the last revision applied.
    async fn watch_from(&self, mut revision: i64) -> Result<i64, etcd_client::Error> {
        let Some(registry) = self.registry.get() else { return Ok(revision) };
        let mut client = self.client.clone();
        let dir = layout::registry_dir(&self.prefix);
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1).with_progress_notify();
        let mut stream = client.watch(dir, Some(options)).await?;
        while let Some(answer) = stream.message().await? {
            if answer.canceled() || answer.compact_revision() > 0 {
                tracing::warn!(reason = %answer.cancel_reason(), "etcd watch cancelled");
                return Ok(revision);
            }
            let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = self.seen();
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(key) = std::str::from_utf8(kv.key()).ok().and_then(|p| Key::parse(&self.prefix, p)) else {
                    continue;
                };
                revision = revision.max(kv.mod_revision());
                // this node's own writes come back: they are already applied
                if seen.get(&key).is_some_and(|&r| r >= kv.mod_revision()) {
                    continue;
                }
                let value = (event.event_type() == EventType::Put).then(|| kv.value());
                match layout::apply(&mut reg, &key, value) {
                    Ok(()) => {
                        seen.insert(key, kv.mod_revision());
                    }
                    Err(why) => self.refused(&key.path(&self.prefix), &why),
                }
            }
            if let Some(h) = answer.header() {
                revision = revision.max(h.revision());
            }
        }
        Ok(revision)
    }

    /// Shows the events the other nodes publish, as they come (from now on), through `show`.
    pub async fn follow_events(self: Arc<Self>, show: impl Fn(Event) + Send + 'static) {
        let dir = layout::events_dir(&self.prefix);
        let mine = format!("{dir}{}/", self.node);
        loop {
            let mut client = self.client.clone();
            let watched = async {
                let mut stream = client.watch(dir.clone(), Some(WatchOptions::new().with_prefix())).await?;
                while let Some(answer) = stream.message().await? {
                    for event in answer.events() {
                        let Some(kv) = event.kv().filter(|_| event.event_type() == EventType::Put) else { continue };
                        if kv.key().starts_with(mine.as_bytes()) {
                            continue;
                        }
                        match serde_json::from_slice::<Event>(kv.value()) {
                            Ok(e) => show(e),
                            Err(why) => self.refused(&String::from_utf8_lossy(kv.key()), &format!("event: {why}")),
                        }
                    }
                }
                Ok::<(), etcd_client::Error>(())
            };
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "watching the other nodes' events failed; again in a second");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Replaces the registry with etcd's whole prefix; the revision read at.
    async fn reload(&self) -> Result<i64, PersistError> {
        let (loaded, revision) = self.load().await?;
        if let (Some(loaded), Some(registry)) = (loaded, self.registry.get()) {
            let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
            let mut merged = loaded;
            // keep the checker's counters for instances whose health did not change
            for (name, svc) in &mut merged.services {
                for (id, inst) in &mut svc.instances {
                    layout::keep_checker_state(reg.services.get(name).and_then(|s| s.instances.get(id)), inst);
                }
            }
            *reg = merged;
        }
        Ok(revision)
    }

    async fn txn(&self, txn: &Txn) -> Result<etcd_client::TxnResponse, PersistError> {
        call(|| {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
    }

    async fn commit_change(&self, change: Change<'_>) -> Result<(), PersistError> {
        let mut compares: Vec<Compare> = {
            let seen = self.seen();
            change
                .keys
                .iter()
                .map(|k| Compare::mod_revision(k.path(&self.prefix), CompareOp::Equal, *seen.get(k).unwrap_or(&0)))
                .collect()
        };
        let fence = if change.fenced {
            let fence = self.leadership.fence().ok_or(PersistError::NotLeader)?;
            compares.push(Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.create_revision));
            Some(fence)
        } else {
            None
        };
        let ops: Vec<TxnOp> = change
            .keys
            .iter()
            .map(|k| match layout::value(change.after, k) {
                Some(bytes) => TxnOp::put(k.path(&self.prefix), bytes, None),
                None => TxnOp::delete(k.path(&self.prefix), None),
            })
            .collect();
        // when refused: what each key is now, to catch up before the change is tried again
        let mut reads: Vec<TxnOp> = change.keys.iter().map(|k| TxnOp::get(k.path(&self.prefix), None)).collect();
        if let Some(f) = &fence {
            reads.push(TxnOp::get(f.key.clone(), None));
        }
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let answer = self.txn(&txn).await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        if answer.succeeded() {
            let mut seen = self.seen();
            for k in change.keys {
                seen.insert(k.clone(), revision);
            }
            return Ok(());
        }
        let mut current: HashMap<String, (Vec<u8>, i64, i64)> = HashMap::new();
        for op in answer.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op {
                for kv in get.kvs() {
                    let path = String::from_utf8_lossy(kv.key()).into_owned();
                    current.insert(path, (kv.value().to_vec(), kv.mod_revision(), kv.create_revision()));
                }
            }
        }
        if let Some(f) = &fence
            && current.get(&f.key).is_none_or(|(_, _, created)| *created != f.create_revision)
        {
            self.leadership.lost();
            return Err(PersistError::NotLeader);
        }
        // bring the refused keys up to date, so that the change can be made again on what etcd holds
        if let Some(registry) = self.registry.get() {
            let mut reg = registry.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = self.seen();
            let mut keys = change.keys.to_vec();
            keys.sort_by_key(|k| matches!(k, Key::Instance(..)));
            for k in keys {
                let entry = current.get(&k.path(&self.prefix));
                match layout::apply(&mut reg, &k, entry.map(|(v, _, _)| v.as_slice())) {
                    Ok(()) => {
                        seen.insert(k, entry.map_or(0, |(_, r, _)| *r));
                    }
                    Err(why) => self.refused(&k.path(&self.prefix), &why),
                }
            }
        }
        Err(PersistError::Conflict)
    }
}

impl Store for EtcdStore {
    fn commit<'a>(&'a self, change: Change<'a>) -> StoreFuture<'a, ()> {
        Box::pin(self.commit_change(change))
    }

    fn confirm_leadership(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let fence = self.leadership.fence().ok_or(PersistError::NotLeader)?;
            let txn = Txn::new().when(vec![Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.create_revision,
            )]);
            let answer = self.txn(&txn).await?;
            if answer.succeeded() {
                Ok(())
            } else {
                self.leadership.lost();
                Err(PersistError::NotLeader)
            }
        })
    }

    fn share_events(&self, events: &[Event]) {
        if !events.is_empty() && self.outbox.try_send(events.to_vec()).is_err() {
            tracing::warn!("events not passed on to the other supervisors: too many waiting");
        }
    }

    fn attach(&self, registry: Arc<Mutex<Registry>>) {
        let _ = self.registry.set(registry);
    }
}

/// Writes this node's events under `dir`, in order, with a lease of [`EVENT_TTL_S`] granted anew when the last one is
/// near its end. An event that cannot be written is shown on this node only.
async fn write_events(mut client: Client, dir: String, mut pending: tokio::sync::mpsc::Receiver<Vec<Event>>) {
    let mut lease: Option<(i64, std::time::Instant)> = None;
    let mut seq = 0u64;
    while let Some(events) = pending.recv().await {
        if lease.is_none_or(|(_, at)| at.elapsed() > Duration::from_secs(EVENT_TTL_S as u64 / 2)) {
            lease = match tokio::time::timeout(CALL_TIMEOUT, client.lease_grant(EVENT_TTL_S, None)).await {
                Ok(Ok(l)) => Some((l.id(), std::time::Instant::now())),
                _ => None,
            };
        }
        let Some((id, _)) = lease else {
            tracing::debug!("no lease for events: not passed on");
            continue;
        };
        for e in events {
            seq += 1;
            let Ok(value) = serde_json::to_vec(&e) else { continue };
            let key = format!("{dir}{:016}-{seq:08}", e.time_ms);
            let put = client.put(key, value, Some(PutOptions::new().with_lease(id)));
            if !matches!(tokio::time::timeout(CALL_TIMEOUT, put).await, Ok(Ok(_))) {
                tracing::debug!("an event was not passed on to the other supervisors");
                lease = None;
            }
        }
    }
}
