//! The health monitor: active HTTP checks of every instance on its own schedule, plus the housekeeping that time
//! drives (drains, heartbeats).
//!
//! A scheduler wakes every 50 ms, starts the checks that are due as separate tasks (so a slow instance never delays
//! another), and never starts a second check of an instance whose previous one is still running. Each instance's next
//! check is its interval with 10% jitter, so checks of many instances spread out instead of arriving in bursts. A check
//! is healthy on any 2xx within the timeout that does not come from one of our proxies (see [`HEALTH_CHECK_HEADER`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::{App, now_ms};

type Key = (String, String);

/// Sent with every health check. A proxy (the bundled one, or Envoy with the shipped configuration) answers a request
/// carrying it with [`PROXY_HEADER`], so an instance registered at a proxy's own address is never healthy: it would
/// send every request it gets back through the proxy (a loop that multiplies the traffic).
pub const HEALTH_CHECK_HEADER: &str = "x-equilibrio-health-check";
/// See [`HEALTH_CHECK_HEADER`].
pub const PROXY_HEADER: &str = "x-equilibrio-proxy";

pub async fn run(app: Arc<App>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // redirects are not followed: an instance answers for its own health, it cannot borrow another host's
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default();
    // when each instance is next due, by service then id: looked up by reference on every tick, so scanning 1,000
    // instances twenty times a second allocates nothing (only a due check makes its key)
    let mut next: HashMap<String, HashMap<String, Instant>> = HashMap::new();
    let running: Arc<Mutex<HashSet<Key>>> = Arc::default();
    // instances found to be a proxy, logged once each
    let looped: Arc<Mutex<HashSet<Key>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !app.leadership.is_leader() {
            // another supervisor checks; when this one leads again, it starts from fresh schedules
            next.clear();
            continue;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let reg = app.registry();
            for (name, svc) in &reg.services {
                let interval = Duration::from_millis(svc.health_check.interval_ms);
                let schedule = match next.get_mut(name.as_str()) {
                    Some(s) => s,
                    None => next.entry(name.clone()).or_default(),
                };
                for (id, inst) in &svc.instances {
                    let at = match schedule.get(id.as_str()) {
                        Some(at) => *at,
                        None => {
                            // first check soon, spread over a tenth of the interval
                            let at = now + interval.mul_f64(fastrand::f64() * 0.1);
                            schedule.insert(id.clone(), at);
                            at
                        }
                    };
                    if at > now {
                        continue;
                    }
                    let key = (name.clone(), id.clone());
                    if !running.lock().map(|r| r.contains(&key)).unwrap_or(true) {
                        let url = format!("http://{}{}", inst.spec.address, svc.health_check.endpoint);
                        due.push((key, url, Duration::from_millis(svc.health_check.timeout_ms)));
                        if let Some(at) = schedule.get_mut(id.as_str()) {
                            *at = now + interval.mul_f64(0.9 + fastrand::f64() * 0.2);
                        }
                    }
                }
                schedule.retain(|id, _| svc.instances.contains_key(id));
            }
            next.retain(|name, _| reg.services.contains_key(name));
        }
        for (key, url, timeout) in due {
            if let Ok(mut r) = running.lock() {
                r.insert(key.clone());
            }
            let (app, client, running, looped) = (app.clone(), client.clone(), running.clone(), looped.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = client.get(&url).header(HEALTH_CHECK_HEADER, "1").timeout(timeout).send().await;
                // an address that is one of our proxies would route the proxies' traffic back to themselves
                let proxy = answer.as_ref().is_ok_and(|r| r.headers().contains_key(PROXY_HEADER));
                if proxy && looped.lock().is_ok_and(|mut l| l.len() < 4096 && l.insert(key.clone())) {
                    tracing::warn!(service = %key.0, instance = %key.1, %url,
                        "this instance's address is an Equilibrio proxy (a routing loop): it stays unhealthy");
                }
                let ok = matches!(answer, Ok(r) if r.status().is_success()) && !proxy;
                let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                app.metrics.check(&key.0, ok, latency_ms / 1000.0);
                let event = app.registry().record_check(&key.0, &key.1, ok, latency_ms, now_ms());
                if let Some(e) = event {
                    transition(&app, &key, e).await;
                }
                if let Ok(mut r) = running.lock() {
                    r.remove(&key);
                }
            });
        }
        housekeeping(&app).await;
    }
}

/// Makes a health transition known: kept in the store (with several supervisors, every node's table follows it),
/// then published. When another node changed the same service at that moment, the transition is made again on what it
/// wrote.
async fn transition(app: &App, key: &Key, event: crate::events::Event) {
    use crate::etcd::layout::Key as StoreKey;
    let keys = vec![StoreKey::Service(key.0.clone()), StoreKey::Instance(key.0.clone(), key.1.clone())];
    match app.publish_as_leader(keys).await {
        Ok(()) => app.observe(vec![event]),
        Err(crate::persist::PersistError::Conflict) => {
            let Some(state) = app
                .registry()
                .service(&key.0)
                .ok()
                .and_then(|s| s.instances.get(&key.1))
                .map(|i| (i.health, i.healthy_since_ms, i.unhealthy_since_ms))
            else {
                return;
            };
            let again = app
                .change_as_leader(|reg, now| {
                    reg.set_health(&key.0, &key.1, state, now);
                    Ok::<_, crate::persist::PersistError>(((), vec![event.clone()]))
                })
                .await;
            if let Err(e) = again {
                tracing::warn!(service = %key.0, instance = %key.1, error = %e, "health transition not kept");
            }
        }
        Err(e) => tracing::warn!(service = %key.0, instance = %key.1, error = %e, "health transition not kept"),
    }
}

/// Drains that finished, heartbeats that expired. Expired heartbeats change what users registered: saved.
async fn housekeeping(app: &App) {
    let now = now_ms();
    let drained = {
        let reports = app.reports();
        app.registry().advance_drains(|s, id| reports.in_flight(s, id, now), now)
    };
    if !drained.is_empty() {
        let keys = drained
            .iter()
            .filter_map(|e| Some(crate::etcd::layout::Key::Instance(e.service.clone(), e.instance.clone()?)))
            .collect();
        // when not kept (a race with another node), the drain is found done again on the next round
        match app.publish_as_leader(keys).await {
            Ok(()) => app.observe(drained),
            Err(e) => tracing::warn!(error = %e, "finished drains not kept; checking again"),
        }
    }
    // a change copies the registry: made only when a heartbeat is missed, not on every round
    if app.registry().missed_heartbeats(now).is_empty() {
        return;
    }
    let expired =
        app.change_as_leader(|reg, now| Ok::<_, crate::persist::PersistError>(((), reg.expire_heartbeats(now)))).await;
    if let Err(e) = expired {
        tracing::error!(error = %e, "cannot save the state after expiring heartbeats");
    }
}
