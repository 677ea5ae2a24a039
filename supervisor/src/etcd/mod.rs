//! Several supervisors on one etcd (`store: {kind: etcd}`): the registry shared through it ([`store`], laid out by
//! [`layout`]), and the election of the one node that runs health checks and the autoscaler ([`election`]).
//! docs/high-availability.md tells the whole story.

pub mod election;
pub mod layout;
pub mod store;
