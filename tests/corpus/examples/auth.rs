//! An auth filter, as the SDK's `http_auth_random` example shows the pattern: every request under `/private` waits
//! for an HTTP call to the `auth` cluster (`GET /auth` with the client's `x-user`); 200 lets it through with
//! `x-auth-user` added, anything else gets 403 from the call's callback.

#[cfg(target_arch = "wasm32")]
mod wasm {
    use std::time::Duration;

    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::{Action, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Auth) });
    }}

    struct Auth;

    impl HttpContext for Auth {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            let path = self.get_http_request_header(":path").unwrap_or_default();
            if !path.starts_with("/private") {
                return Action::Continue;
            }
            let user = self.get_http_request_header("x-user").unwrap_or_default();
            let headers =
                vec![(":method", "GET"), (":path", "/auth"), (":authority", "auth"), ("x-user", user.as_str())];
            match self.dispatch_http_call("auth", headers, None, vec![], Duration::from_secs(5)) {
                Ok(_) => Action::Pause,
                Err(e) => {
                    proxy_wasm::hostcalls::log(LogLevel::Warn, &format!("corpus: auth call failed: {e:?}")).ok();
                    self.send_http_response(503, vec![], Some(b"auth unavailable\n"));
                    Action::Pause
                }
            }
        }
    }

    impl Context for Auth {
        fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
            let status = self.get_http_call_response_header(":status").unwrap_or_default();
            let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
            let user = self.get_http_request_header("x-user").unwrap_or_default();
            proxy_wasm::hostcalls::log(
                LogLevel::Info,
                &format!("corpus: auth answered {status} ({} body bytes) for user `{user}`", body.len()),
            )
            .ok();
            if status == "200" {
                self.set_http_request_header("x-auth-user", Some(&user));
                self.resume_http_request();
            } else {
                self.send_http_response(403, vec![("x-auth", "denied")], Some(b"Access forbidden.\n"));
            }
        }
    }
}
