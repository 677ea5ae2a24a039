//! The host side of the proxy-wasm ABI 0.2.1 (the spec's `abi-versions/v0.2.1/README.md` is the contract): its
//! numbers, guest memory access, and the `env.proxy_*` functions a filter imports.

pub mod imports;
pub mod memory;
pub mod types;
pub mod wasi;

/// The serialized header map's codec, shared with the filter (the guest side of the same format).
pub use equilibrio_contract::pairs;
