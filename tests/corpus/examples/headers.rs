//! A header filter, as the SDK's `http_headers` example shows the pattern: it logs the request's header names
//! (sorted), and adds `x-powered-by` to every response, which it logs too.

#[cfg(target_arch = "wasm32")]
mod wasm {
    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::{Action, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Headers) });
    }}

    struct Headers;

    impl Context for Headers {}

    fn log(message: &str) {
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("corpus: {message}")).ok();
    }

    impl HttpContext for Headers {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            let mut names: Vec<String> = self.get_http_request_headers().into_iter().map(|(k, _)| k).collect();
            names.sort();
            log(&format!("request headers (end of stream: {end_of_stream}): {}", names.join(" ")));
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            let status = self.get_http_response_header(":status").unwrap_or_default();
            self.add_http_response_header("x-powered-by", "equilibrio-corpus");
            log(&format!("response {status}"));
            Action::Continue
        }
    }
}
