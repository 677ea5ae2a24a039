//! Equilibrio's proxy-wasm filter: balancing, sticky sessions and rate limiting.
//!
//! The crate is a plain-Rust core, tested natively, plus a thin proxy-wasm adapter ([`wasm`], compiled only for
//! `wasm32`) that moves data between the host and the core. Start at [`worker`] (what happens to a request) and
//! [`poller`] (how the endpoint table arrives); each algorithm has its own module under [`balancer`].
//!
//! | module | concept |
//! |---|---|
//! | [`config`] | the plugin JSON, strict validation, runtime policy merge (the policy's types: `equilibrio-contract`) |
//! | [`table`] | the endpoint table wire format from the supervisor (the `equilibrio-contract` crate) |
//! | [`snapshot`] | a worker's derived view of one table |
//! | [`worker`] | a worker's state and the order of a request's decisions |
//! | [`request`] | what the filter reads of a request: client address, hash and rate-limit keys |
//! | [`selector`] | the policy's algorithm over a snapshot, with the state it keeps |
//! | [`routing`] | request-aware routes: which route a request takes, its pool and its policy |
//! | [`inflight`] | in-flight counts per endpoint, exact across workers when balanced on |
//! | [`poller`] | table fetch, publication to all workers, reports |
//! | [`balancer`] | smooth WRR, power of two choices, peak EWMA, consistent hashing with bounded load, random |
//! | [`sticky`], [`cookie`] | signed session cookies |
//! | [`ratelimit`] | shared token buckets in bounded memory |
//! | [`client`] | client address and X-Forwarded-For trust |
//! | [`outlier`] | passive health ejections and each endpoint's breaker (closed, open, half-open) |
//! | [`detection`] | success-rate and failure-percentage outlier detection, per interval |
//! | [`locality`] | zone-aware locality: the local zone's share, and where the overflow goes |
//! | [`report`] | per-endpoint aggregates and the report to the supervisor |
//! | [`sampling`] | which requests' outcomes a worker reads, under load |
//! | [`shared`] | the shared-data store abstraction and CAS updates |
//! | [`counters`] | the shared counting keys, and the one context that creates each |

pub mod balancer;
pub mod client;
pub mod config;
pub mod cookie;
pub mod counters;
pub mod detection;
pub mod inflight;
pub mod locality;
pub mod outlier;
pub mod poller;
pub mod ratelimit;
pub mod report;
pub mod request;
pub mod routing;
pub mod sampling;
pub mod selector;
pub mod shared;
pub mod snapshot;
pub mod sticky;
pub mod worker;

#[cfg(target_arch = "wasm32")]
pub mod wasm;

/// The request header that carries the ordered upstream list to the proxy. Never trusted from clients.
pub use equilibrio_contract::UPSTREAM_HEADER;
/// The endpoint table wire format, from the contract crate (shared with the supervisor).
pub use equilibrio_contract::table;
