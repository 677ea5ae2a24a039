//! Events: every change the supervisor makes or observes (registered, healthy, draining, policy changed...).
//!
//! Each event goes to the log, to the live SSE stream (`GET /v1/events`), to a short in-memory history, and to the
//! configured webhooks. Publishing never blocks: the stream is a broadcast channel (a slow subscriber misses events and
//! is told how many), and each webhook has its own queue and retries with exponential backoff.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Registered,
    Deregistered,
    Healthy,
    Unhealthy,
    Draining,
    Drained,
    WeightChanged,
    ZoneChanged,
    PolicyChanged,
    HealthCheckChanged,
    ScalingPolicyChanged,
    ScaledUp,
    ScaledDown,
    ScalingFailed,
    InstanceReplaced,
    /// Too much of a service is unhealthy at once for replacements to be the answer: they are held (an alert).
    ReplacementsHeld,
    ReplacementsResumed,
    /// A Swarm service's replica count was changed by someone else (`docker service scale`): adopted, or set back
    /// to the policy's bounds or to a manual scale through the API.
    ReplicasChangedOutside,
    DockerUnreachable,
    DockerReachable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub time_ms: u64,
    pub kind: EventKind,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[schema(value_type = Object)]
    pub detail: Value,
}

impl Event {
    pub fn new(time_ms: u64, kind: EventKind, service: &str, instance: Option<&str>, detail: Value) -> Event {
        Event { time_ms, kind, service: service.to_string(), instance: instance.map(str::to_string), detail }
    }
}

/// Events kept for `GET /v1/events?history=true` and late SSE subscribers.
const HISTORY: usize = 1000;
/// Per-webhook queue: beyond it, the oldest undelivered events are dropped (and counted).
const WEBHOOK_QUEUE: usize = 1000;

pub struct EventBus {
    live: broadcast::Sender<Event>,
    history: Mutex<VecDeque<Event>>,
    webhooks: Vec<mpsc::Sender<Event>>,
}

impl EventBus {
    /// A bus; with webhook URLs, it spawns one delivery task per URL (so it must run inside a tokio runtime).
    /// `https://` webhooks trust the platform's roots and the certificates of `ca_pem`.
    pub fn new(webhooks: &[String], ca_pem: Option<&[u8]>) -> EventBus {
        let (live, _) = broadcast::channel(1024);
        let client = webhook_client(ca_pem);
        let webhooks = webhooks
            .iter()
            .map(|url| {
                let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
                tokio::spawn(deliver(client.clone(), url.clone(), rx));
                tx
            })
            .collect();
        EventBus { live, history: Mutex::new(VecDeque::new()), webhooks }
    }

    /// Publishes events of this supervisor: log, history, stream and webhooks.
    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        for e in events {
            tracing::info!(kind = ?e.kind, service = %e.service, instance = e.instance.as_deref().unwrap_or("-"), detail = %e.detail, "event");
            for w in &self.webhooks {
                if w.try_send(e.clone()).is_err() {
                    tracing::warn!("webhook queue full: event dropped");
                }
            }
            self.show(e);
        }
    }

    /// Shows an event another supervisor published (several on etcd): history and stream only. That supervisor
    /// delivers it to the webhooks, so that each is delivered once.
    pub fn publish_remote(&self, e: Event) {
        self.show(e);
    }

    fn show(&self, e: Event) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() >= HISTORY {
                h.pop_front();
            }
            h.push_back(e.clone());
        }
        let _ = self.live.send(e);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    pub fn history(&self, service: Option<&str>) -> Vec<Event> {
        self.history
            .lock()
            .map(|h| h.iter().filter(|e| service.is_none_or(|s| e.service == s)).cloned().collect())
            .unwrap_or_default()
    }
}

/// The webhooks' HTTP client: rustls with the platform's roots, plus the configured CA certificates (checked when the
/// configuration was read).
fn webhook_client(ca_pem: Option<&[u8]>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(5)).use_rustls_tls();
    for cert in ca_pem.and_then(|pem| reqwest::Certificate::from_pem_bundle(pem).ok()).unwrap_or_default() {
        builder = builder.add_root_certificate(cert);
    }
    builder.build().unwrap_or_else(|e| {
        tracing::error!(error = %e, "webhook client: falling back to the default TLS settings");
        reqwest::Client::new()
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Delivers events to one webhook in order, retrying each with exponential backoff (100 ms doubling, 6 tries).
async fn deliver(client: reqwest::Client, url: String, mut rx: mpsc::Receiver<Event>) {
    while let Some(event) = rx.recv().await {
        let body = serde_json::to_vec(&event).unwrap_or_default();
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=6 {
            let sent = client.post(&url).header("content-type", "application/json").body(body.clone()).send().await;
            let why = match sent {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => format!("answered {}", r.status()),
                // the source chain says why (a TLS certificate the roots do not trust, a refused connection...)
                Err(e) => error_chain(&e),
            };
            if attempt == 6 {
                tracing::warn!(%url, error = %why, "webhook failed 6 times: event dropped");
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
}
