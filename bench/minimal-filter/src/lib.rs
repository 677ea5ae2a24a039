//! Benchmark reference, not a product: the floor of any balancing filter in Envoy. It round-robins over the comma-
//! separated addresses of its plugin configuration into `x-equilibrio-upstream` and does nothing else, and it exports
//! one per-request callback only (`proxy_on_request_headers`, the one a balancing filter cannot do without), so the
//! host enters the VM once per request. `scripts/bench` puts it beside Envoy's native round robin to show what the
//! proxy-wasm machinery itself costs, whatever the filter does.
//!
//! For measuring what host calls cost, a configuration `probe:<kind>:<n>|<addresses>` makes `n` extra calls per request
//! of one kind: `property` (`source.address`), `header` (a request header), `time`, `shared` (a shared-data read).
//!
//! It speaks the ABI directly (no SDK): the SDK exports every callback, and Envoy enters the VM for each exported one.

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod wasm {
    use std::cell::RefCell;

    #[link(wasm_import_module = "env")]
    unsafe extern "C" {
        fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ret: *mut *mut u8, size: *mut usize) -> u32;
        fn proxy_replace_header_map_value(map: u32, k: *const u8, kn: usize, v: *const u8, vn: usize) -> u32;
        fn proxy_get_header_map_value(map: u32, k: *const u8, kn: usize, ret: *mut *mut u8, size: *mut usize) -> u32;
        fn proxy_get_property(path: *const u8, n: usize, ret: *mut *mut u8, size: *mut usize) -> u32;
        fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
        fn proxy_get_shared_data(k: *const u8, kn: usize, ret: *mut *mut u8, size: *mut usize, cas: *mut u32) -> u32;
    }

    #[derive(Default)]
    struct State {
        hosts: Vec<String>,
        next: usize,
        probe: (String, usize),
    }

    thread_local! {
        static STATE: RefCell<State> = RefCell::new(State::default());
    }

    #[unsafe(no_mangle)]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    #[unsafe(no_mangle)]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size)).as_mut_ptr()
    }

    /// Runs a host call that returns data, and frees the data.
    fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Option<Vec<u8>> {
        let (mut ptr, mut size) = (std::ptr::null_mut::<u8>(), 0usize);
        // SAFETY: the host allocated `ptr` with `proxy_on_memory_allocate(size)`
        (call(&mut ptr, &mut size) == 0 && !ptr.is_null()).then(|| unsafe { Vec::from_raw_parts(ptr, size, size) })
    }

    #[unsafe(no_mangle)]
    pub extern "C" fn proxy_on_configure(_root: u32, size: usize) -> u32 {
        // SAFETY: the out-pointers are the closure's arguments, valid for the call
        let cfg = returned(|p, s| unsafe { proxy_get_buffer_bytes(7, 0, size, p, s) }).unwrap_or_default();
        let text = String::from_utf8(cfg).unwrap_or_default();
        let (probe, text) = match text.strip_prefix("probe:").and_then(|r| r.split_once('|')) {
            Some((p, rest)) => (p.to_string(), rest.to_string()),
            None => (String::new(), text),
        };
        let (kind, n) = probe.split_once(':').unwrap_or(("", "0"));
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.probe = (kind.to_string(), n.parse().unwrap_or(0));
            s.hosts = text.split(',').map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect();
        });
        1
    }

    #[unsafe(no_mangle)]
    pub extern "C" fn proxy_on_request_headers(_context: u32, _headers: usize, _end_of_stream: u32) -> u32 {
        STATE.with(|s| {
            let Ok(mut s) = s.try_borrow_mut() else { return };
            for _ in 0..s.probe.1 {
                // SAFETY (each call): pointers to live locals and literals, valid for the call
                match s.probe.0.as_str() {
                    "property" => {
                        drop(returned(|p, n| unsafe { proxy_get_property(b"source\0address".as_ptr(), 14, p, n) }))
                    }
                    "header" => {
                        drop(returned(|p, n| unsafe { proxy_get_header_map_value(0, b":path".as_ptr(), 5, p, n) }))
                    }
                    "time" => drop(unsafe { proxy_get_current_time_nanoseconds(&mut 0) }),
                    "shared" => {
                        drop(returned(|p, n| unsafe { proxy_get_shared_data(b"probe".as_ptr(), 5, p, n, &mut 0) }))
                    }
                    _ => {}
                }
            }
            let n = s.next;
            s.next = n.wrapping_add(1);
            if let Some(host) = s.hosts.get(n % s.hosts.len().max(1)) {
                let key = "x-equilibrio-upstream";
                // SAFETY: pointers into live strings
                unsafe { proxy_replace_header_map_value(0, key.as_ptr(), key.len(), host.as_ptr(), host.len()) };
            }
        });
        0
    }
}
