//! The deployment profile (`environment` in the configuration): production, staging or development. Each part that
//! has profile defaults (health checks in `config.rs`, scaling policies in `scaling/policy.rs`) reads it from here.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    Production,
    Staging,
    #[default]
    Development,
}
