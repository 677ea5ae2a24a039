//! Auto-scaling: the decision ([`policy`]), the plan of container actions ([`planner`]), the container runtime
//! ([`runtime`]: Docker through bollard, and an in-memory fake for tests) and the control loop ([`controller`]).

pub mod controller;
pub mod docker;
pub mod planner;
pub mod policy;
pub mod runtime;
