//! The wire contract between the supervisor and the proxies, typed once for both sides (and for the tests' stand-in
//! supervisor): the endpoint table the filter takes ([`table`]), Envoy's EDS answer made from the same endpoints
//! ([`eds`]), the reports the filter sends back ([`report`]), what may be shown of a policy ([`policy`]), and the header through which the filter names the
//! upstream; and what every configuration shares ([`keyed`]: durations, errors that name the key). No proxy-wasm dependency: it builds for `wasm32-wasip1` (the filter) and natively (the supervisor, the
//! bundled proxy, the tests). A field added here is seen by every side, or by none.

pub mod eds;
pub mod keyed;
pub mod policy;
pub mod report;
pub mod table;

/// The request header through which the filter names the upstream hosts, in order (Envoy's `override_host`). A
/// client's own is removed before any filter runs.
pub const UPSTREAM_HEADER: &str = "x-equilibrio-upstream";

/// A byte of an id (service, endpoint, tag): `[A-Za-z0-9._-]`.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}
