//! The host side of the proxy-wasm ABI 0.2.1 (the spec's `abi-versions/v0.2.1/README.md` is the contract): its
//! numbers, the serialized header map, guest memory access, and the `env.proxy_*` functions a filter imports.

pub mod imports;
pub mod memory;
pub mod pairs;
pub mod types;
pub mod wasi;
