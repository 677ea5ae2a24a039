//! A response-body redaction filter, as the SDK's `http_body` example shows the pattern: the length header goes
//! (the body may change size), the body is buffered to its end, and every `secret` becomes `******`.

#[cfg(target_arch = "wasm32")]
mod wasm {
    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::{Action, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Redact) });
    }}

    struct Redact;

    impl Context for Redact {}

    impl HttpContext for Redact {
        fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            if !end_of_stream {
                self.set_http_response_header("content-length", None);
            }
            Action::Continue
        }

        fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            if !end_of_stream {
                return Action::Pause;
            }
            let Some(body) = self.get_http_response_body(0, body_size) else { return Action::Continue };
            let text = String::from_utf8_lossy(&body);
            let count = text.matches("secret").count();
            if count > 0 {
                let redacted = text.replace("secret", "******");
                self.set_http_response_body(0, body_size, redacted.as_bytes());
                proxy_wasm::hostcalls::log(LogLevel::Info, &format!("corpus: redacted {count} of {body_size} bytes"))
                    .ok();
            }
            Action::Continue
        }
    }
}
