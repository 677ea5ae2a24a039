//! equilibrio-host, the bundled proxy: an HTTP/1.1 and HTTP/2 reverse proxy on hyper that runs proxy-wasm filters
//! on wasmtime through its own implementation of the proxy-wasm ABI 0.2.1 host side, in Envoy's model (a singleton
//! service VM, one filter VM per worker, shared data by `vm_id`), so the same `.wasm` behaves the same in both.
//!
//! Start at [`config`] (what an operator writes), then [`worker`] (threads and connections), [`proxy`] (one
//! request), [`driver`] and [`vm`] (running a filter), and [`abi`] (the host functions).

pub mod abi;
pub mod admin;
pub mod body;
pub mod body_filters;
pub mod client_body;
pub mod client_io;
pub mod config;
pub mod conn_timer;
pub mod context;
pub mod driver;
pub mod forward;
pub mod headers;
pub mod http_call;
pub mod line_ends;
pub mod properties;
pub mod proxy;
pub mod retry_budget;
pub mod shared_data;
pub mod stats;
pub mod stream_end;
pub mod upstream;
pub mod vm;
pub mod worker;
