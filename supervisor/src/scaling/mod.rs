//! Auto-scaling: the decision ([`policy`]), the plan of container actions ([`planner`]), the container runtime
//! ([`runtime`]: Docker through bollard; `fake_runtime` in tests), the control loop ([`controller`]), cost
//! accounting ([`cost`]), the memory it keeps per service ([`state`]), request-rate units ([`rate`]) and the calibration
//! of request-rate thresholds ([`calibration`]).

pub mod calibration;
pub mod controller;
pub mod cost;
pub mod docker;
#[cfg(test)]
pub mod fake_runtime;
pub mod planner;
pub mod policy;
pub mod rate;
pub mod runtime;
pub mod state;
