//! Benchmark reference, not a product: the floor of any balancing filter in Envoy. It round-robins over the comma-
//! separated addresses of its plugin configuration into `x-equilibrio-upstream` and does nothing else, so
//! `scripts/bench` can tell how much of the filter's cost is Envoy's wasm machinery and how much is ours.
//!
//! For measuring what host calls cost, a configuration `probe:<kind>:<n>|<addresses>` makes `n` extra calls per request
//! of one kind: `property` (`source.address`), `header` (a request header), `time`, `shared` (a shared-data read).

#[cfg(target_arch = "wasm32")]
mod wasm {
    use std::cell::Cell;
    use std::rc::Rc;

    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| Box::new(Root { hosts: Rc::new(Vec::new()), next: Rc::new(Cell::new(0)), probe: Rc::new((String::new(), 0)) }));
    }}

    struct Root {
        hosts: Rc<Vec<String>>,
        next: Rc<Cell<usize>>,
        probe: Rc<(String, usize)>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _: usize) -> bool {
            let cfg = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten();
            let text = cfg.and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
            let (probe, text) = match text.strip_prefix("probe:").and_then(|r| r.split_once('|')) {
                Some((p, rest)) => (p.to_string(), rest.to_string()),
                None => (String::new(), text),
            };
            let (kind, n) = probe.split_once(':').unwrap_or(("", "0"));
            self.probe = Rc::new((kind.to_string(), n.parse().unwrap_or(0)));
            self.hosts = Rc::new(text.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect());
            true
        }

        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Pick { hosts: self.hosts.clone(), next: self.next.clone(), probe: self.probe.clone() }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Pick {
        hosts: Rc<Vec<String>>,
        next: Rc<Cell<usize>>,
        probe: Rc<(String, usize)>,
    }

    impl Context for Pick {}

    impl HttpContext for Pick {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            for _ in 0..self.probe.1 {
                match self.probe.0.as_str() {
                    "property" => drop(hostcalls::get_property(vec!["source", "address"])),
                    "header" => drop(hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path")),
                    "time" => drop(hostcalls::get_current_time()),
                    "shared" => drop(hostcalls::get_shared_data("probe")),
                    _ => {}
                }
            }
            let n = self.next.get();
            self.next.set(n.wrapping_add(1));
            let host = self.hosts.get(n % self.hosts.len().max(1)).map(String::as_str);
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-equilibrio-upstream", host);
            Action::Continue
        }
    }
}
