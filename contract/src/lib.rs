//! The contracts between the project's parts, typed once for every side: the endpoint table the supervisor serves
//! and the filter takes ([`table`]), Envoy's EDS answer made from the same endpoints ([`eds`]), the reports the filter
//! sends back ([`report`]), the balancing policy both sides parse the same way ([`policy`], its request-aware [`route`]s), the header through which
//! the filter names the upstream, the proxy-wasm header-map encoding the filter and the bundled proxy exchange
//! ([`pairs`]); and what every configuration shares ([`keyed`]: durations, the keyed deserializer; [`field_error`]: one
//! error naming the key). No proxy-wasm dependency: it builds for `wasm32-wasip1` (the filter) and natively (the
//! supervisor, the bundled proxy, the tests). A field added here is seen by every side, or by none.

pub mod eds;
pub mod field_error;
pub mod keyed;
pub mod pairs;
pub mod policy;
pub mod report;
pub mod route;
pub mod table;

pub use field_error::FieldError;
/// The request header through which the filter names the upstream hosts, in order (Envoy's `override_host`). A
/// client's own is removed before any filter runs.
pub const UPSTREAM_HEADER: &str = "x-equilibrio-upstream";

/// A byte of an id (service, endpoint, tag): `[A-Za-z0-9._-]`.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}
