//! Auto-scaling: the decision ([`policy`]), the plan of container actions ([`planner`]), the container runtime
//! ([`runtime`]: Docker through bollard, and an in-memory fake for tests), the control loop ([`controller`]), cost
//! accounting ([`cost`]) and request-rate units ([`rate`]).

pub mod controller;
pub mod cost;
pub mod docker;
pub mod planner;
pub mod policy;
pub mod rate;
pub mod runtime;
