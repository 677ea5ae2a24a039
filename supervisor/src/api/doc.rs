//! Schemas of the OpenAPI document that no handler type gives as is: bodies the handlers parse by hand (a
//! registration, a policy change, Envoy's discovery request), the duration format, the event stream's frames. Each
//! states the rules the handler enforces, so that the contract tests (`scripts/contract-test`) can hold the API to
//! its document in both directions: what the document allows is accepted, what it refuses is refused.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use equilibrio_contract::policy::{Algorithm, POLICY_KEYS};

/// A duration: seconds (a number), or a string with a unit (`500ms`, `2s`, `5m`, `1h`).
pub struct Duration;

impl PartialSchema for Duration {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Number).minimum(Some(0.0)).maximum(Some(1e9)))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*(ms|s|m|h)?\s*$")),
            )
            .description(Some("seconds, or a string with a unit: 500ms, 2s, 5m, 1h"))
            .into()
    }
}

impl ToSchema for Duration {}

/// A tag or a capability: 1 to 64 of `[A-Za-z0-9._-]`.
#[derive(ToSchema)]
#[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
#[allow(dead_code)] // a document type
pub struct Label(pub String);

/// A registration (`POST /v1/services/{service}/instances`): the instance and an optional heartbeat TTL.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // a document type: read by utoipa, never built
pub struct Registration {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    id: String,
    /// `ip:port` where the proxies reach it: IPv4, or IPv6 in brackets; port 1 to 65535.
    #[schema(
        pattern = r"^(((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])|\[[0-9A-Fa-f:.]+(%[0-9]+)?\]):0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
    )]
    address: String,
    #[serde(default)]
    #[schema(maximum = 1_000_000, default = 100)]
    weight: u32,
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._-]{0,64}$")]
    zone: String,
    #[serde(default)]
    #[schema(value_type = Vec<Label>, max_items = 16)]
    tags: Vec<String>,
    #[serde(default)]
    #[schema(pattern = "^[!-~]{0,64}$")]
    version: String,
    #[serde(default)]
    #[schema(value_type = Vec<Label>, max_items = 16)]
    capabilities: Vec<String>,
    /// Without a heartbeat within this time (1 s to 24 h) the instance is removed.
    #[schema(value_type = Option<Duration>)]
    heartbeat_ttl: Option<String>,
}

/// A policy change (`PUT /v1/services/{service}/policy`): the policy keys ([`POLICY_KEYS`]), each optional; the
/// nested objects are validated as every proxy validates them (`equilibrio_contract::policy`, docs/filter.md).
pub struct PolicyUpdate;

impl PartialSchema for PolicyUpdate {
    fn schema() -> RefOr<Schema> {
        let mut o = ObjectBuilder::new().additional_properties(Some(AdditionalProperties::FreeForm(false)));
        for key in POLICY_KEYS {
            o = match key {
                "algorithm" => o.property(key, Algorithm::schema()),
                _ => o.property(key, ObjectBuilder::new().schema_type(Type::Object)),
            };
        }
        o.into()
    }
}

impl ToSchema for PolicyUpdate {}

/// What an event-stream frame says.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // a document type
pub enum FrameKind {
    /// `data` is an [`crate::events::Event`] as JSON.
    Event,
    /// The reader fell behind: `data` is how many events it missed.
    Lagged,
}

/// One frame of `GET /v1/events` (server-sent events).
#[derive(ToSchema)]
#[allow(dead_code)] // a document type
pub struct SseFrame {
    event: FrameKind,
    data: String,
}

/// `InstanceSpec` refuses unknown fields (so does its YAML), which utoipa writes as `additionalProperties: false`;
/// but the views compose it with more fields (`allOf`), and a closed member of an `allOf` refuses them all. Opened
/// here, in the document only: a registration's body has its own closed schema ([`Registration`]).
pub struct OpenComposedSchemas;

impl utoipa::Modify for OpenComposedSchemas {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = doc.components.as_mut()
            && let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut("InstanceSpec")
        {
            o.additional_properties = None;
        }
    }
}
