//! Equilibrio's supervisor: registers and health-checks instances, serves the endpoint table and the balancing policy
//! to the proxies (the filter's table and Envoy's REST EDS), takes their traffic reports, and is where operators tune
//! everything at runtime through the REST API.
//!
//! | module | concept |
//! |---|---|
//! | [`config`] | the YAML configuration, profiles, validation |
//! | [`registry`] | services, instances, health and drain state; every change an event |
//! | [`health`] | the rise/fall health state machine |
//! | [`monitor`] | active health checks and time-driven housekeeping |
//! | [`table`] | the tables served to the proxies |
//! | [`reports`] | traffic per instance from the proxies' reports |
//! | [`events`] | log, SSE stream and webhooks |
//! | [`store`] | where the registry is kept: the trait, and no store |
//! | [`persist`] | the atomic state file (one supervisor) |
//! | [`etcd`] | several supervisors on etcd: the shared registry, its layout, the leader election |
//! | [`leadership`] | whether this node runs the active work, and the fence of its writes |
//! | [`metrics`] | Prometheus metrics |
//! | [`api`] | the REST API |
//! | [`serve`] | the API's HTTP server and its limits (header read timeout, connection cap, graceful drain) |
//! | [`app`] | shared state and the single path of every change |

pub mod api;
pub mod app;
pub mod config;
pub mod environment;
pub mod etcd;
pub mod events;
pub mod health;
pub mod leadership;
pub mod metrics;
pub mod monitor;
pub mod persist;
pub mod registry;
pub mod reports;
pub mod scaling;
pub mod secret;
pub mod serve;
pub mod store;
pub mod table;
