//! The proxy-wasm adapter: the only code that talks to the host. It moves data between the host ABI and the plain-Rust
//! core, and decides nothing itself.
//!
//! One `.wasm`, two roles chosen by the plugin's root id: `equilibrio_poller` is the singleton service (Envoy's
//! `envoy.bootstrap.wasm`) that fetches the table and reports; any other root id is the HTTP filter on a worker.

mod filter;
mod host;
mod metrics;
mod poller;

use proxy_wasm::traits::RootContext;

/// The root id that selects the poller role.
pub const POLLER_ROOT_ID: &str = "equilibrio_poller";

proxy_wasm::main! {{
    proxy_wasm::set_root_context(new_root);
}}

fn new_root(context_id: u32) -> Box<dyn RootContext> {
    let root_id = host::property_string(&["plugin_root_id"]).unwrap_or_default();
    if root_id == POLLER_ROOT_ID {
        Box::new(poller::PollerRoot::new())
    } else {
        Box::new(filter::FilterRoot::new(context_id))
    }
}
