//! Auto-scaling: the decision ([`policy`]), the plan of container actions ([`planner`]), the container runtime
//! ([`runtime`]: Docker through bollard; `fake_runtime` in tests), for Docker Swarm services the plan ([`swarm_plan`]),
//! which tasks Swarm removes ([`swarm_order`]) and the Swarm API ([`swarm`]), the control loop ([`controller`]), cost
//! accounting ([`cost`]), the memory it keeps per service ([`state`]), request-rate units ([`rate`]) and the
//! calibration of request-rate thresholds ([`calibration`]).

pub mod calibration;
pub mod controller;
pub mod cost;
pub mod docker;
pub mod docker_call;
#[cfg(test)]
pub mod fake_runtime;
pub mod planner;
pub mod policy;
pub mod rate;
pub mod runtime;
pub mod state;
pub mod swarm;
pub mod swarm_order;
pub mod swarm_plan;
