//! Our purpose-built module: a request's `x-case` header picks which ABI calls and callbacks it exercises, so that
//! the harness can compare each one between Envoy and equilibrio-host:
//!
//! - `view`: answers with the request header map it sees (sorted `name: value` lines, the count the host gave, and
//!   what `host` and `:authority` read as);
//! - `reply` / `reply-empty`: a local reply with a body and a header / with neither; the response phase reports the
//!   response header names it saw (`x-seen`);
//! - `tick-reply`: pauses; the root context's tick answers the stream (`proxy_set_effective_context`);
//! - `call-headers`: pauses on an HTTP call; its callback reads the request headers, adds one and resumes;
//! - `call-reply`: pauses on an HTTP call; its callback answers 403;
//! - `remove-length`: removes the response's `content-length`;
//! - `upper-request`: buffers the request body to its end and sends it upstream in capitals;
//! - `buffer-request`: buffers the request body without end (the host's limit applies);
//! - `hold-response`: stops the response head, buffers the body, then sets a new body and its length;
//! - `buffer-response`: buffers the response body without end (the limit applies after the head went);
//! - `continue-response`: stops the response head on an HTTP call; its callback adds a header and resumes;
//! - `reply-in-response`: answers 502 locally from the response-head callback;
//! - `reset`: resets the stream (`proxy_close_stream`);
//! - `state`: answers with what it reads of properties (request, plugin, upstream), shared data (set, then read back
//!   with its CAS, a stale CAS refused) and a counter metric (defined, incremented, read);
//! - `response-properties`: reports the response properties it reads in the response phase (`x-props`);
//! - `calls`: replaces the request headers with `proxy_set_header_map_pairs` (drops `x-drop`, adds `x-calls` with the
//!   map's size from `proxy_get_header_map_size`, the log level, and a property written then read back), so the
//!   upstream's echo shows the result;
//! - `trailers`: logs the request trailers the host gives (`proxy_on_request_trailers`) and adds one;
//! - `grpc`: answers with the status `proxy_grpc_call` returned (the bundled proxy does not implement gRPC calls:
//!   `Unimplemented`, logged once per module; not compared with Envoy, which does).
//!
//! The HTTP-call callback also logs what `proxy_get_status` answers there.

#[cfg(target_arch = "wasm32")]
mod wasm {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;

    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { waiting: Rc::default() }) });
    }}

    /// The ABI calls the SDK does not wrap, or wraps with a panic on statuses we want to see: declared here with the
    /// spec's signatures, their status returned as a number.
    #[allow(unsafe_code)]
    mod raw {
        #[link(wasm_import_module = "env")]
        unsafe extern "C" {
            fn proxy_get_header_map_size(map_type: u32, return_size: *mut usize) -> u32;
            fn proxy_get_status(code: *mut u32, message_data: *mut *mut u8, message_size: *mut usize) -> u32;
            #[allow(clippy::too_many_arguments)]
            fn proxy_grpc_call(
                upstream_data: *const u8,
                upstream_size: usize,
                service_data: *const u8,
                service_size: usize,
                method_data: *const u8,
                method_size: usize,
                metadata_data: *const u8,
                metadata_size: usize,
                message_data: *const u8,
                message_size: usize,
                timeout_ms: u32,
                return_token: *mut u32,
            ) -> u32;
        }

        /// `proxy_get_header_map_size` of a map type: its status and the size.
        pub fn header_map_size(map_type: u32) -> (u32, usize) {
            let mut size = 0;
            // SAFETY: the host writes one usize through a pointer to a live local
            let status = unsafe { proxy_get_header_map_size(map_type, &mut size) };
            (status, size)
        }

        /// `proxy_get_status`: its status, the code and the message (whose buffer the host allocated with our
        /// allocator, or left null).
        pub fn status() -> (u32, u32, String) {
            let (mut code, mut data, mut size) = (0u32, std::ptr::null_mut::<u8>(), 0usize);
            // SAFETY: the host writes through pointers to live locals
            let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
            let message = if data.is_null() {
                String::new()
            } else {
                // SAFETY: the host allocated `size` bytes at `data` with this module's allocator, which we now own
                String::from_utf8_lossy(&unsafe { Vec::from_raw_parts(data, size, size) }).into_owned()
            };
            (status, code, message)
        }

        /// `proxy_grpc_call` to the `auth` cluster: its status.
        pub fn grpc_call() -> u32 {
            let (upstream, service, method) = ("auth", "corpus.Check", "Allow");
            let mut token = 0;
            // SAFETY: every pointer is to a live local of the given length; the host writes one u32
            unsafe {
                proxy_grpc_call(
                    upstream.as_ptr(),
                    upstream.len(),
                    service.as_ptr(),
                    service.len(),
                    method.as_ptr(),
                    method.len(),
                    std::ptr::null(),
                    0,
                    std::ptr::null(),
                    0,
                    1000,
                    &mut token,
                )
            }
        }
    }

    fn log(message: &str) {
        hostcalls::log(LogLevel::Info, &format!("corpus: {message}")).ok();
    }

    /// Streams waiting for the tick to answer them.
    type Waiting = Rc<RefCell<Vec<u32>>>;

    struct Root {
        waiting: Waiting,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _: usize) -> bool {
            self.set_tick_period(Duration::from_millis(50));
            true
        }

        fn on_tick(&mut self) {
            let ids: Vec<u32> = self.waiting.borrow_mut().drain(..).collect();
            for id in ids {
                if hostcalls::set_effective_context(id).is_ok() {
                    let path = hostcalls::get_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, ":path");
                    let path = path.ok().flatten().unwrap_or_default();
                    let body = format!("answered from the tick for {path}\n");
                    hostcalls::send_http_response(202, vec![("x-from", "tick")], Some(body.as_bytes())).ok();
                }
            }
        }

        fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Abi { id, case: String::new(), waiting: self.waiting.clone() }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// A property as text (integers as 8 little-endian bytes, as Envoy encodes them).
    fn property(path: &[&str]) -> String {
        match hostcalls::get_property(path.to_vec()) {
            Ok(Some(b)) if b.len() == 8 && path.last().is_some_and(|l| *l == "code" || l.ends_with("port")) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b);
                i64::from_le_bytes(a).to_string()
            }
            Ok(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(None) => "<none>".into(),
            Err(e) => format!("<{e:?}>"),
        }
    }

    /// Properties, shared data and a metric, read and written from a request's context.
    fn state_report() -> String {
        let mut out = Vec::new();
        for path in [
            &["request", "path"][..],
            &["request", "url_path"],
            &["request", "method"],
            &["request", "scheme"],
            &["request", "protocol"],
            &["request", "host"],
            &["request", "useragent"],
            &["plugin_name"],
            &["plugin_root_id"],
            &["no", "such", "property"],
        ] {
            out.push(format!("{}={}", path.join("."), property(path)));
        }
        // shared data: a fresh key, written without a CAS, read back, then a stale CAS refused
        let key = "corpus-state";
        let first = hostcalls::get_shared_data(key).ok();
        let cas = first.as_ref().and_then(|(_, cas)| *cas);
        let set = hostcalls::set_shared_data(key, Some(b"v1"), cas);
        let (value, _) = hostcalls::get_shared_data(key).unwrap_or((None, None));
        let stale = hostcalls::set_shared_data(key, Some(b"v2"), Some(cas.unwrap_or(0).wrapping_add(1000)));
        out.push(format!(
            "shared: set={set:?} value={} stale_cas={stale:?}",
            value.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default()
        ));
        // a counter defined twice under one name (Envoy gives a new id each time, we the same one: either way both
        // count the same metric), incremented through one id, read through the other
        let id = hostcalls::define_metric(proxy_wasm::types::MetricType::Counter, "corpus_requests");
        let again = hostcalls::define_metric(proxy_wasm::types::MetricType::Counter, "corpus_requests");
        let counted = match (id, again) {
            (Ok(id), Ok(again)) => {
                let before = hostcalls::get_metric(again).unwrap_or(0);
                let _ = hostcalls::increment_metric(id, 1);
                Ok(hostcalls::get_metric(again).unwrap_or(0).saturating_sub(before))
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        out.push(format!("metric: one_name_one_counter_incremented_by={counted:?}"));
        out.join("\n") + "\n"
    }

    struct Abi {
        id: u32,
        case: String,
        waiting: Waiting,
    }

    impl Abi {
        fn call(&self) -> Action {
            let headers = vec![(":method", "GET"), (":path", "/auth"), (":authority", "auth"), ("x-user", "alice")];
            match self.dispatch_http_call("auth", headers, None, vec![], Duration::from_secs(5)) {
                Ok(_) => Action::Pause,
                Err(e) => {
                    log(&format!("call failed: {e:?}"));
                    Action::Continue
                }
            }
        }
    }

    impl Context for Abi {
        fn on_done(&mut self) -> bool {
            if !self.case.is_empty() {
                log(&format!("{}: on_done", self.case));
            }
            true
        }

        fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
            let status = self.get_http_call_response_header(":status").unwrap_or_default();
            let mut names: Vec<String> = self.get_http_call_response_headers().into_iter().map(|(k, _)| k).collect();
            names.sort();
            log(&format!("{}: call answered {status} with {}", self.case, names.join(" ")));
            let (got, code, message) = raw::status();
            log(&format!("{}: proxy_get_status gave status {got}, code {code}, message {message:?}", self.case));
            match self.case.as_str() {
                "call-headers" => {
                    let user = self.get_http_request_header("x-user").unwrap_or_else(|| "<none>".into());
                    let path = self.get_http_request_header(":path").unwrap_or_default();
                    self.set_http_request_header("x-from-callback", Some(&format!("{user} {path}")));
                    self.resume_http_request();
                }
                "call-reply" => {
                    self.send_http_response(403, vec![("x-from", "callback")], Some(b"denied from the callback\n"));
                }
                "continue-response" => {
                    let status = self.get_http_response_header(":status").unwrap_or_default();
                    self.set_http_response_header("x-from-callback", Some(&format!("upstream said {status}")));
                    self.resume_http_response();
                }
                _ => {}
            }
        }
    }

    impl HttpContext for Abi {
        fn on_http_request_headers(&mut self, count: usize, end_of_stream: bool) -> Action {
            self.case = self.get_http_request_header("x-case").unwrap_or_default();
            match self.case.as_str() {
                "view" => {
                    let mut lines: Vec<String> =
                        self.get_http_request_headers().into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    lines.sort();
                    let host = self.get_http_request_header("host").unwrap_or_else(|| "<none>".into());
                    let authority = self.get_http_request_header(":authority").unwrap_or_else(|| "<none>".into());
                    let body = format!(
                        "count={count} end_of_stream={end_of_stream}\nhost={host}\nauthority={authority}\n{}\n",
                        lines.join("\n")
                    );
                    self.send_http_response(200, vec![], Some(body.as_bytes()));
                    Action::Pause
                }
                "reply" => {
                    self.send_http_response(418, vec![("x-abi", "reply")], Some(b"short and stout"));
                    Action::Pause
                }
                "reply-empty" => {
                    self.send_http_response(204, vec![], None);
                    Action::Pause
                }
                "tick-reply" => {
                    self.waiting.borrow_mut().push(self.id);
                    Action::Pause
                }
                "call-headers" | "call-reply" => self.call(),
                "reset" => {
                    self.reset_http_request();
                    Action::Pause
                }
                "calls" => {
                    // the size is the names' and values' lengths (Envoy's byteSize): the same view, so the same sum
                    let (status, size) = raw::header_map_size(0);
                    let pairs = self.get_http_request_headers();
                    let names_and_values: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
                    let level = hostcalls::get_log_level().map(|l| l as u32);
                    let text = |v: Option<Vec<u8>>| v.map(|v| String::from_utf8_lossy(&v).into_owned());
                    // one segment reads back; Envoy reads a longer path by its first segment only
                    let set = hostcalls::set_property(vec!["corpus_note"], Some(b"written"));
                    let read = hostcalls::get_property(vec!["corpus_note"]).map(text);
                    let set_long = hostcalls::set_property(vec!["corpus", "note"], Some(b"written"));
                    let read_long = hostcalls::get_property(vec!["corpus", "note"]).map(text);
                    let report = format!(
                        "size status={status} equals names and values={}; log level={level:?}; property set={set:?} \
                         read={read:?}, two segments set={set_long:?} read={read_long:?}",
                        size == names_and_values
                    );
                    let mut pairs: Vec<(String, String)> =
                        self.get_http_request_headers().into_iter().filter(|(k, _)| k != "x-drop").collect();
                    pairs.push(("x-calls".into(), report));
                    self.set_http_request_headers(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect());
                    Action::Continue
                }
                "grpc" => {
                    let body = format!("proxy_grpc_call gave status {}\n", raw::grpc_call());
                    self.send_http_response(200, vec![], Some(body.as_bytes()));
                    Action::Pause
                }
                "state" => {
                    let body = state_report();
                    self.send_http_response(200, vec![], Some(body.as_bytes()));
                    Action::Pause
                }
                _ => Action::Continue,
            }
        }

        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            match self.case.as_str() {
                "upper-request" if !end_of_stream => Action::Pause,
                "upper-request" => {
                    let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                    log(&format!("request body of {body_size} bytes"));
                    self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
                    Action::Continue
                }
                "buffer-request" => Action::Pause,
                _ => Action::Continue,
            }
        }

        fn on_http_request_trailers(&mut self, count: usize) -> Action {
            if self.case == "trailers" {
                let mut lines: Vec<String> =
                    self.get_http_request_trailers().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
                lines.sort();
                log(&format!("trailers: {count} request trailers: {}", lines.join(" ")));
                self.add_http_request_trailer("x-added-trailer", "by the filter");
            }
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            let mut names: Vec<String> = self.get_http_response_headers().into_iter().map(|(k, _)| k).collect();
            names.sort();
            self.set_http_response_header("x-seen", Some(&names.join(" ")));
            match self.case.as_str() {
                "remove-length" => {
                    self.set_http_response_header("content-length", None);
                    Action::Continue
                }
                "hold-response" | "buffer-held-response" if !end_of_stream => Action::Pause,
                "continue-response" => self.call(),
                "response-properties" => {
                    let props: Vec<String> =
                        [&["response", "code"][..], &["upstream", "address"], &["response", "code_details"]]
                            .iter()
                            .map(|p| format!("{}={}", p.join("."), property(p)))
                            .collect();
                    self.set_http_response_header("x-props", Some(&props.join(" ")));
                    Action::Continue
                }
                "reply-in-response" => {
                    self.send_http_response(502, vec![("x-from", "response")], Some(b"replaced in the response\n"));
                    Action::Pause
                }
                _ => Action::Continue,
            }
        }

        fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            match self.case.as_str() {
                "hold-response" if !end_of_stream => Action::Pause,
                "hold-response" => {
                    let body = self.get_http_response_body(0, body_size).unwrap_or_default();
                    let new = format!("held {} bytes: {}", body.len(), String::from_utf8_lossy(&body).to_uppercase());
                    self.set_http_response_body(0, body_size, new.as_bytes());
                    self.set_http_response_header("content-length", Some(&new.len().to_string()));
                    Action::Continue
                }
                "buffer-response" | "buffer-held-response" => Action::Pause,
                _ => Action::Continue,
            }
        }

        fn on_log(&mut self) {
            if !self.case.is_empty() {
                let status = self.get_http_response_header(":status").unwrap_or_else(|| "<none>".into());
                log(&format!("{}: done with {status}", self.case));
            }
        }
    }
}
