//! Leader election among the supervisors sharing an etcd prefix: whoever creates `<prefix>/leader` with its lease
//! leads until the lease is gone.
//!
//! Each node holds a lease of `lease_ttl`, renewed three times per TTL. A follower tries to create the key every
//! 200 ms (a transaction that succeeds only if the key does not exist), so a new leader is in place within the TTL
//! (the old leader's lease running out) and a fraction of a second. The winner leads until its last renewal plus the
//! TTL, less a margin ([`crate::leadership::Leadership`]); a renewal that fails or is late ends its leadership at
//! once. A node that stops resigns: it revokes its lease, and the next leader takes over within 200 ms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::leadership::{Fence, Leadership};

/// Taken off the lease's end: this node stops acting before etcd lets another one win (clock rates differ a little).
const MARGIN: Duration = Duration::from_millis(500);
/// How often a follower tries to become the leader.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(200);

/// The value of the leader key: who leads, and where its API is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub node_id: String,
    /// `http://ip:port` of its API.
    pub url: String,
}

pub struct Election {
    pub client: Client,
    /// `<prefix>/leader`.
    pub key: String,
    pub me: LeaderInfo,
    pub ttl: Duration,
    pub leadership: Arc<Leadership>,
}

/// The leader key of a prefix.
pub fn leader_key(prefix: &str) -> String {
    format!("{prefix}/leader")
}

/// Who leads now, if anyone (as etcd says).
pub async fn current_leader(client: &Client, prefix: &str) -> Option<LeaderInfo> {
    let mut client = client.clone();
    let answer = tokio::time::timeout(Duration::from_secs(2), client.get(leader_key(prefix), None)).await.ok()?.ok()?;
    serde_json::from_slice(answer.kvs().first()?.value()).ok()
}

impl Election {
    /// Campaigns, leads and renews until `stop` turns true; then resigns.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let outcome = self.session(&mut stop).await;
            self.leadership.lost();
            match outcome {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd session lost: not leading; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }

    /// One lease: campaign and lead on it until it cannot be renewed (`Err`) or `stop` (`Ok`).
    async fn session(&self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<(), String> {
        let mut client = self.client.clone();
        let ttl_s = self.ttl.as_secs().max(1) as i64;
        let mut renewed_at = Instant::now();
        let lease = timeout(client.lease_grant(ttl_s, None)).await?.id();
        let (mut keeper, mut renewals) = timeout(client.lease_keep_alive(lease)).await?;
        let mut renew = tokio::time::interval(self.ttl / 3);
        renew.tick().await;
        let mut campaign = tokio::time::interval(CAMPAIGN_EVERY);
        campaign.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let value = serde_json::to_vec(&self.me).map_err(|e| e.to_string())?;
        let result = loop {
            tokio::select! {
                _ = stop.changed() => break Ok(()),
                _ = renew.tick() => {
                    let sent = Instant::now();
                    let renewal = async {
                        keeper.keep_alive().await?;
                        renewals.message().await
                    };
                    match tokio::time::timeout(self.ttl / 3, renewal).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {
                            renewed_at = sent;
                            self.leadership.renewed(sent + self.ttl.saturating_sub(MARGIN));
                        }
                        Ok(Ok(_)) => break Err("the lease expired".to_string()),
                        Ok(Err(e)) => break Err(e.to_string()),
                        Err(_) => break Err("the lease renewal timed out".to_string()),
                    }
                }
                _ = campaign.tick(), if !self.leadership.is_leader() => {
                    let txn = Txn::new()
                        .when(vec![Compare::version(self.key.clone(), CompareOp::Equal, 0)])
                        .and_then(vec![TxnOp::put(self.key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease)))])
                        .or_else(vec![TxnOp::get(self.key.clone(), None)]);
                    match tokio::time::timeout(Duration::from_secs(2), client.txn(txn)).await {
                        Ok(Ok(answer)) => {
                            // won now, or the key is already this lease's (leadership lapsed here by time, not in etcd)
                            let holder = answer.op_responses().into_iter().find_map(|op| match op {
                                etcd_client::TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                                _ => None,
                            });
                            let created = if answer.succeeded() {
                                answer.header().map(|h| h.revision())
                            } else {
                                holder.as_ref().filter(|kv| kv.lease() == lease).map(|kv| kv.create_revision())
                            };
                            let leader = match (&created, &holder) {
                                (Some(_), _) => Some(self.me.url.clone()),
                                (None, Some(kv)) => serde_json::from_slice::<LeaderInfo>(kv.value()).ok().map(|l| l.url),
                                (None, None) => None,
                            };
                            self.leadership.set_leader_url(leader);
                            if let Some(revision) = created {
                                let fence = Fence { key: self.key.clone(), create_revision: revision };
                                self.leadership.won(fence, renewed_at + self.ttl.saturating_sub(MARGIN));
                                tracing::info!(node = %self.me.node_id, revision, "leading: health checks and the autoscaler run here");
                            }
                        }
                        Ok(Err(e)) => break Err(e.to_string()),
                        Err(_) => break Err("campaign timed out".to_string()),
                    }
                }
            }
        };
        if self.leadership.is_leader() {
            tracing::info!(node = %self.me.node_id, "resigning the leadership");
        }
        self.leadership.lost();
        // resign (or give up a lease that can no longer be renewed): the leader key goes with it
        let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
        result
    }
}

async fn timeout<T>(f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(2), f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("etcd did not answer within 2 s".to_string()),
    }
}
