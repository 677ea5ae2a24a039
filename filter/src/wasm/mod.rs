//! The proxy-wasm adapter: the only code that talks to the host. It moves data between the host ABI and the plain-Rust
//! core, and decides nothing itself.
//!
//! One `.wasm`, two roles chosen by the plugin's root id: `equilibrio_poller` is the singleton service (Envoy's
//! `envoy.bootstrap.wasm`) that fetches the table and reports; any other root id is the HTTP filter on a worker.
//!
//! The module exports only the callbacks it uses: the configuration, the tick, the answers to HTTP calls, and per
//! request its headers, its response headers and its end (`proxy_on_log`). A host skips what is not exported, and in
//! Envoy every callback entered costs more than the filter's own work (see [`abi`]): a request enters the VM three
//! times (twice without sticky sessions) instead of seven. The end of a request is `proxy_on_log`, which both Envoy
//! and equilibrio-host call once for every request, so there is no `proxy_on_done` or `proxy_on_delete`; and there is
//! no `proxy_on_context_create`: a root is made when it is configured, a request's state at its headers (see
//! [`Contexts::stream`] for which root it belongs to).

// the exports are `#[unsafe(no_mangle)]` (the ABI names them); there is no `unsafe` block here
#![allow(unsafe_code)]

mod abi;
mod filter;
mod host;
mod metrics;
mod poller;

use std::cell::RefCell;
use std::collections::HashMap;

use abi::{BufferType, LogLevel};
use filter::{Action, FilterRoot, Stream};
use poller::PollerRoot;

/// The root id that selects the poller role.
pub const POLLER_ROOT_ID: &str = "equilibrio_poller";

/// A bound on requests in progress per VM. A request's state is dropped at its end; if a host ever failed to report
/// ends, the oldest states beyond this bound are dropped instead of growing without limit.
const MAX_STREAMS: usize = 1 << 16;

enum Root {
    Filter(FilterRoot),
    Poller(Box<PollerRoot>),
}

/// Which plugin a root serves, as the host names it (`plugin_root_id`, `plugin_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PluginKey {
    root_id: String,
    name: String,
}

impl PluginKey {
    fn of_current() -> PluginKey {
        PluginKey {
            root_id: host::property_string(&["plugin_root_id"]).unwrap_or_default(),
            name: host::property_string(&["plugin_name"]).unwrap_or_default(),
        }
    }
}

#[derive(Default)]
struct Contexts {
    roots: HashMap<u32, (PluginKey, Root)>,
    streams: HashMap<u32, Stream>,
    dropped_streams: u64,
}

impl Contexts {
    /// Configures root `root_id`, made here for its plugin if new. Accepted, it replaces any other root of the same
    /// plugin (a configuration update makes a new root; requests under way keep the old one's state); refused, a root
    /// made here is dropped and the plugin's previous root, if any, serves on (the host keeps the previous
    /// configuration), and a root configured again keeps its previous configuration.
    fn configure(&mut self, root_id: u32, bytes: &[u8]) -> bool {
        let key = PluginKey::of_current();
        let made = self.roots.get(&root_id).is_none_or(|(k, _)| *k != key);
        if made {
            let root = if key.root_id == POLLER_ROOT_ID {
                Root::Poller(Box::new(PollerRoot::new()))
            } else {
                Root::Filter(FilterRoot::new(root_id))
            };
            self.roots.insert(root_id, (key.clone(), root));
        }
        let accepted = match self.roots.get_mut(&root_id) {
            Some((_, Root::Filter(root))) => root.on_configure(bytes),
            Some((_, Root::Poller(root))) => root.on_configure(bytes),
            None => false,
        };
        if accepted {
            self.roots.retain(|&id, (k, _)| id == root_id || *k != key);
        } else if made {
            self.roots.remove(&root_id);
        }
        accepted
    }

    /// The state of request `context_id`, made at its first callback. Its root is the VM's filter root; only when a
    /// VM serves several filter plugins (Envoy shares a VM between plugins of the same `vm_id`) does the request ask
    /// the host which plugin it runs under: one or two host calls, instead of a `proxy_on_context_create` entry into
    /// the VM for every request of every configuration.
    fn stream(&mut self, context_id: u32) -> Option<&mut Stream> {
        if !self.streams.contains_key(&context_id) {
            let stream = self.root_for_stream()?.new_stream()?;
            self.insert_stream(context_id, stream);
        }
        self.streams.get_mut(&context_id)
    }

    fn root_for_stream(&self) -> Option<&FilterRoot> {
        let mut filters = self.roots.values().filter_map(|(k, r)| match r {
            Root::Filter(f) => Some((k, f)),
            Root::Poller(_) => None,
        });
        let first = filters.next()?;
        if filters.next().is_none() {
            return Some(first.1);
        }
        let key = PluginKey::of_current();
        self.roots.values().find_map(|(k, r)| match r {
            Root::Filter(f) if *k == key => Some(f),
            _ => None,
        })
    }

    fn insert_stream(&mut self, context_id: u32, stream: Stream) {
        if self.streams.len() >= MAX_STREAMS {
            // context ids grow: keep the newest half
            let floor = context_id.wrapping_sub((MAX_STREAMS / 2) as u32);
            let before = self.streams.len();
            self.streams.retain(|&id, _| id.wrapping_sub(floor) <= (MAX_STREAMS / 2) as u32);
            self.dropped_streams += (before - self.streams.len()) as u64;
            host::log(
                LogLevel::Warn,
                &format!("{} requests never ended; their state was dropped", self.dropped_streams),
            );
        }
        self.streams.insert(context_id, stream);
    }
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = RefCell::new(Contexts::default());
}

/// Runs `f` on the VM's contexts (`None` if a callback re-entered while another holds them: ignored, never a panic).
fn with<R>(f: impl FnOnce(&mut Contexts) -> R) -> Option<R> {
    CONTEXTS.with(|c| c.try_borrow_mut().ok().map(|mut c| f(&mut c)))
}

/// Marks the ABI version the module speaks.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The plugin's configuration (its root is made here); `0` refuses it (the host then refuses the plugin).
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(root_id: u32, size: usize) -> u32 {
    let bytes = abi::buffer(BufferType::PluginConfiguration, size).unwrap_or_default();
    let accepted = with(|c| c.configure(root_id, &bytes));
    u32::from(accepted.unwrap_or(false))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    with(|c| match c.roots.get_mut(&root_id) {
        Some((_, Root::Filter(root))) => root.on_tick(),
        Some((_, Root::Poller(root))) => root.on_tick(),
        None => {}
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_http_call_response(root_id: u32, token: u32, headers: usize, body_size: usize, _: usize) {
    with(|c| {
        if let Some((_, Root::Poller(root))) = c.roots.get_mut(&root_id) {
            root.on_http_call_response(token, headers, body_size);
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    let action = with(|c| c.stream(context_id).map(Stream::on_request_headers)).flatten();
    action.unwrap_or(Action::Continue) as u32
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_headers(context_id: u32, _headers: usize, _end_of_stream: u32) -> u32 {
    let action = with(|c| c.streams.get_mut(&context_id).map(Stream::on_response_headers)).flatten();
    action.unwrap_or(Action::Continue) as u32
}

/// The end of a request: its accounting, then its state is dropped.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_log(context_id: u32) {
    if let Some(stream) = with(|c| c.streams.remove(&context_id)).flatten() {
        stream.on_log();
    }
}
