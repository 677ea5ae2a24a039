//! A test filter, not a product: it lets `tests/tests/host.rs` see the bundled proxy's host side from the inside.
//! Its plugin configuration is a comma-separated list of upstream addresses: each request lists them all, starting
//! one further each time (round robin, with the rest as retry targets). A request's
//! `x-probe` header picks an action:
//! - `trap`: the VM traps (`unreachable`), as a crashing filter would;
//! - `unsupported`: calls host functions the proxy does not implement (gRPC, shared queues, one of no ABI) and
//!   answers with the status numbers it got, in `x-grpc-status`, `x-queue-status` and `x-future-status`;
//! - `properties`: answers with the properties it reads, one `name=value` per line;
//! - `reply`: answers 418 locally with a header and a body;
//! - `loop`: never returns (a filter bug the host must interrupt);
//! - `leak`: keeps 16 MiB more memory each request (a leak the host must stop at its limit).
//!
//! The response phase adds `x-probe-response-status` (the `:status` it saw).

#[cfg(target_arch = "wasm32")]
mod wasm {
    use std::cell::Cell;
    use std::rc::Rc;

    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::new(Root { hosts: Rc::new(Vec::new()), next: Rc::new(Cell::new(0)) }));
    }}

    struct Root {
        hosts: Rc<Vec<String>>,
        next: Rc<Cell<usize>>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _: usize) -> bool {
            let cfg = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten();
            let text = cfg.and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
            if text == "refuse" {
                let _ = hostcalls::log(proxy_wasm::types::LogLevel::Error, "probe: refusing configuration `refuse`");
                return false;
            }
            self.hosts = Rc::new(text.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect());
            true
        }

        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Probe { hosts: self.hosts.clone(), next: self.next.clone() }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Probe {
        hosts: Rc<Vec<String>>,
        next: Rc<Cell<usize>>,
    }

    impl Context for Probe {}

    /// Raw imports, because the SDK treats statuses it does not expect as a panic: we want the number.
    #[allow(unsafe_code)]
    mod unsupported {
        #[link(wasm_import_module = "env")]
        unsafe extern "C" {
            fn proxy_grpc_cancel(token: u32) -> u32;
            fn proxy_enqueue_shared_queue(queue: u32, data: *const u8, size: usize) -> u32;
            fn proxy_call_from_a_future_abi(x: u32) -> u32;
        }

        pub fn call_all() -> (u32, u32, u32) {
            // SAFETY: plain host calls with a valid (empty) buffer
            unsafe {
                (
                    proxy_grpc_cancel(1),
                    proxy_enqueue_shared_queue(1, [0u8; 1].as_ptr(), 0),
                    proxy_call_from_a_future_abi(7),
                )
            }
        }
    }

    fn property(path: &[&str]) -> String {
        match hostcalls::get_property(path.to_vec()) {
            Ok(Some(bytes)) if bytes.len() == 8 && !bytes.iter().all(u8::is_ascii_graphic) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&bytes);
                i64::from_le_bytes(a).to_string()
            }
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(None) => "<none>".into(),
            Err(s) => format!("<{s:?}>"),
        }
    }

    impl HttpContext for Probe {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            let action = hostcalls::get_map_value(MapType::HttpRequestHeaders, "x-probe").ok().flatten();
            match action.as_deref() {
                Some("trap") => core::arch::wasm32::unreachable(),
                // a bug that never returns: the host must stop it and keep the worker serving
                Some("loop") => {
                    let mut x = 1u64;
                    loop {
                        x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                }
                // a leak: 16 MiB more each request, never freed; the host must stop it at its memory limit
                Some("leak") => {
                    let block = vec![1u8; 16 << 20];
                    core::mem::forget(core::hint::black_box(block));
                }
                Some("unsupported") => {
                    let (g, q, f) = unsupported::call_all();
                    let (g, q, f) = (g.to_string(), q.to_string(), f.to_string());
                    let headers = vec![
                        ("x-grpc-status", g.as_str()),
                        ("x-queue-status", q.as_str()),
                        ("x-future-status", f.as_str()),
                    ];
                    let _ = hostcalls::send_http_response(200, headers, None);
                    return Action::Pause;
                }
                Some("properties") => {
                    let mut body = String::new();
                    for path in [
                        &["source", "address"][..],
                        &["destination", "address"],
                        &["request", "path"],
                        &["request", "method"],
                        &["request", "host"],
                        &["request", "protocol"],
                        &["plugin_name"],
                        &["plugin_root_id"],
                        &["plugin_vm_id"],
                        &["no", "such", "property"],
                    ] {
                        body.push_str(&format!("{}={}\n", path.join("."), property(path)));
                    }
                    let _ = hostcalls::send_http_response(200, vec![], Some(body.as_bytes()));
                    return Action::Pause;
                }
                Some("reply") => {
                    let _ =
                        hostcalls::send_http_response(418, vec![("x-probe-reply", "yes")], Some(b"short and stout"));
                    return Action::Pause;
                }
                _ => {}
            }
            // every host, starting one further each request: `a,b,c`, then `b,c,a`...
            let n = self.next.get();
            self.next.set(n.wrapping_add(1));
            let len = self.hosts.len();
            let list: Vec<&str> = (0..len).map(|i| self.hosts[(n + i) % len].as_str()).collect();
            let value = list.join(",");
            let host = if value.is_empty() { None } else { Some(value.as_str()) };
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-equilibrio-upstream", host);
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status").ok().flatten();
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                "x-probe-response-status",
                Some(status.as_deref().unwrap_or("none")),
            );
            Action::Continue
        }
    }
}
