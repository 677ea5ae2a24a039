//! Auto-scaling: the decision ([`policy`]), the plan of container actions ([`planner`]), the container runtime
//! ([`runtime`]: Docker through bollard, and an in-memory fake for tests), the control loop ([`controller`]), cost
//! accounting ([`cost`]), request-rate units ([`rate`]) and the calibration of request-rate thresholds ([`calibration`]).

pub mod calibration;
pub mod controller;
pub mod cost;
pub mod docker;
pub mod planner;
pub mod policy;
pub mod rate;
pub mod runtime;
