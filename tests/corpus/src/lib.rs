//! The conformance corpus: proxy-wasm modules that `tests/tests/conformance.rs` runs in real Envoy (the reference)
//! and in `equilibrio-host`, sending both the same requests and comparing everything a client and the logs show.
//! Each module is an example of this crate (`examples/`):
//!
//! - `abi`: ours, purpose-built; a request's `x-case` header picks which ABI calls and callbacks it exercises
//!   (local replies from every context, header views, body buffering, stream control).
//! - `auth`, `redact`, `headers`: our own equivalents of the proxy-wasm Rust SDK's public examples
//!   (`http_auth_random`, `http_body`, `http_headers`), written as a third-party filter author would: an auth check
//!   through an HTTP call, a response-body redaction, header logging and decoration.
//! - `as_gate` (`assemblyscript/`): a module from another SDK and language, built from the npm registry's packages:
//!   the public AssemblyScript SDK (`@solo-io/proxy-runtime`, ABI 0.2.0, its own `malloc`), compiled by
//!   AssemblyScript 0.14 (both pinned by `package-lock.json`) to `target/corpus/as_gate.wasm`.
//!
//! Every line they log starts with `corpus:`, so the harness can compare the two proxies' logs.
