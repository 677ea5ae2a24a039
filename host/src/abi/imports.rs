//! The `env.proxy_*` host functions. Each reads its arguments from guest memory, acts on the VM's [`HostState`]
//! and answers with a [`Status`]; only a trap inside the guest's own allocator propagates as a trap. Functions we
//! do not support (gRPC, shared queues, anything newer) answer `Unimplemented`: see [`define_missing`].

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Linker, Module, Val, ValType};

use super::memory::{C, borrow, borrow2, give, read, write_u32, write_u64};
use super::pairs;
use super::types::{BufferType, HostResult, MapType, MetricKind, Status, code, log_level_code};
use crate::context::{HostState, HttpCall, LocalReply};
use crate::headers::Headers;
use crate::shared_data::SetError;

/// Runs `f` on the header map `map` of the current call (the effective context's stream, which may be a paused one
/// reached from an HTTP-call or tick callback).
fn with_map<R>(
    state: &mut HostState,
    map: i32,
    f: impl FnOnce(&mut Headers) -> Result<R, Status>,
) -> Result<R, Status> {
    let map = MapType::from_code(map).ok_or(Status::BadArgument)?;
    match map {
        MapType::RequestHeaders => f(&mut Headers::Request(&mut state.stream_mut().ok_or(Status::NotFound)?.request)),
        MapType::ResponseHeaders => {
            let s = state.stream_mut().ok_or(Status::NotFound)?;
            f(&mut Headers::Response(s.response.as_mut().ok_or(Status::NotFound)?))
        }
        MapType::RequestTrailers => {
            let s = state.stream_mut().ok_or(Status::NotFound)?;
            f(&mut Headers::Map(s.request_trailers.as_mut().ok_or(Status::NotFound)?))
        }
        MapType::ResponseTrailers => {
            let s = state.stream_mut().ok_or(Status::NotFound)?;
            f(&mut Headers::Map(s.response_trailers.as_mut().ok_or(Status::NotFound)?))
        }
        MapType::HttpCallResponseHeaders => {
            f(&mut Headers::List(&mut state.call_response.as_mut().ok_or(Status::NotFound)?.headers))
        }
        MapType::HttpCallResponseTrailers => {
            f(&mut Headers::List(&mut state.call_response.as_mut().ok_or(Status::NotFound)?.trailers))
        }
        // gRPC metadata: no gRPC calls
        _ => Err(Status::NotFound),
    }
}

fn buffer(state: &HostState, kind: i32) -> Result<&[u8], Status> {
    match BufferType::from_code(kind).ok_or(Status::BadArgument)? {
        BufferType::PluginConfiguration => Ok(&state.plugin.configuration),
        BufferType::VmConfiguration => Ok(&state.plugin.vm_configuration),
        BufferType::HttpCallResponseBody => Ok(&state.call_response.as_ref().ok_or(Status::NotFound)?.body),
        BufferType::RequestBody => body(state, false),
        BufferType::ResponseBody => body(state, true),
        // no network filters, no gRPC
        _ => Err(Status::NotFound),
    }
}

/// The body being called back for, if it is the one asked for.
fn body(state: &HostState, response: bool) -> Result<&[u8], Status> {
    match &state.body {
        Some(b) if b.response == response => Ok(&b.bytes),
        _ => Err(Status::NotFound),
    }
}

/// `proxy_set_buffer_bytes` on a body, as Envoy does it: `start` 0 and `length` 0 prepends, `start` 0 and a
/// `length` covering the buffer replaces it, `start` at or past its end appends; anything else is `BadArgument`.
pub fn set_body(buffer: &mut Vec<u8>, start: usize, length: usize, data: &[u8]) -> Result<(), Status> {
    if start == 0 {
        if length == 0 {
            buffer.splice(0..0, data.iter().copied());
        } else if length >= buffer.len() {
            buffer.clear();
            buffer.extend_from_slice(data);
        } else {
            return Err(Status::BadArgument);
        }
    } else if start >= buffer.len() {
        buffer.extend_from_slice(data);
    } else {
        return Err(Status::BadArgument);
    }
    Ok(())
}

/// Turns a `Result<Result<(), Status>>` from [`give`] into the function's answer.
fn answer(r: wasmtime::Result<HostResult>) -> wasmtime::Result<i32> {
    r.map(code)
}

fn status_of(r: Result<wasmtime::Result<HostResult>, Status>) -> wasmtime::Result<i32> {
    match r {
        Ok(inner) => answer(inner),
        Err(s) => Ok(s.code()),
    }
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap("env", "proxy_log", |c: C, level: i32, ptr: i32, len: i32| -> i32 {
        let r = (|| {
            if level < log_level_code(c.data().env.log_level) {
                return Ok(());
            }
            let msg = read(&c, ptr, len)?;
            c.data().log_line(level, &String::from_utf8_lossy(&msg));
            Ok(())
        })();
        code(r)
    })?;
    linker.func_wrap("env", "proxy_get_log_level", |mut c: C, ret: i32| -> i32 {
        let level = log_level_code(c.data().env.log_level) as u32;
        code(write_u32(&mut c, ret, level))
    })?;
    linker.func_wrap("env", "proxy_get_current_time_nanoseconds", |mut c: C, ret: i32| -> i32 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        code(write_u64(&mut c, ret, now))
    })?;
    linker.func_wrap("env", "proxy_set_tick_period_milliseconds", |mut c: C, period: i32| -> i32 {
        c.data_mut().effects.tick_period_ms = Some(period as u32);
        Status::Ok.code()
    })?;
    linker.func_wrap("env", "proxy_set_effective_context", |mut c: C, context: i32| -> i32 {
        c.data_mut().effective_context = context as u32;
        Status::Ok.code()
    })?;
    linker.func_wrap("env", "proxy_done", |_c: C| -> i32 { Status::Ok.code() })?;

    // buffers
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> wasmtime::Result<i32> {
            let bytes = match buffer(c.data(), kind) {
                Ok(b) => {
                    let (start, max) = (start as u32 as usize, max as u32 as usize);
                    let end = start.saturating_add(max).min(b.len());
                    b.get(start.min(end)..end).unwrap_or_default().to_vec()
                }
                Err(s) => return Ok(s.code()),
            };
            answer(give(&mut c, &bytes, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap("env", "proxy_get_buffer_status", |mut c: C, kind: i32, ret_len: i32, ret_flags: i32| -> i32 {
        let len = match buffer(c.data(), kind) {
            Ok(b) => b.len() as u32,
            Err(s) => return s.code(),
        };
        code(write_u32(&mut c, ret_len, len).and_then(|()| write_u32(&mut c, ret_flags, 0)))
    })?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C, kind: i32, start: i32, length: i32, ptr: i32, size: i32| -> i32 {
            let response = match BufferType::from_code(kind) {
                Some(BufferType::RequestBody) => false,
                Some(BufferType::ResponseBody) => true,
                Some(_) => return Status::BadArgument.code(),
                None => return Status::BadArgument.code(),
            };
            let r = borrow(&mut c, ptr, size).and_then(|(data, state)| match &mut state.body {
                Some(b) if b.response == response => {
                    set_body(&mut b.bytes, start as u32 as usize, length as u32 as usize, data)
                }
                _ => Err(Status::NotFound),
            });
            code(r)
        },
    )?;

    // header maps
    linker.func_wrap("env", "proxy_get_header_map_pairs", |mut c: C, map: i32, ret_ptr: i32, ret_size: i32| {
        let data = with_map(c.data_mut(), map, |h| Ok(h.serialize()));
        status_of(data.map(|d| give(&mut c, &d, ret_ptr, ret_size)))
    })?;
    linker.func_wrap("env", "proxy_set_header_map_pairs", |mut c: C, map: i32, ptr: i32, len: i32| -> i32 {
        let r = read(&c, ptr, len)
            .and_then(|d| pairs::decode(&d).ok_or(Status::BadArgument))
            .and_then(|p| with_map(c.data_mut(), map, |h| h.set_all(p)));
        code(r)
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C, map: i32, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32| {
            let value = borrow(&mut c, kp, kl).and_then(|(k, state)| {
                with_map(state, map, |h| h.get(k).map(|v| v.into_owned()).ok_or(Status::NotFound))
            });
            status_of(value.map(|v| give(&mut c, &v, ret_ptr, ret_size)))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
            let r =
                borrow2(&mut c, (kp, kl), (vp, vl)).and_then(|(k, v, state)| with_map(state, map, |h| h.replace(k, v)));
            code(r)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
            let r = borrow2(&mut c, (kp, kl), (vp, vl)).and_then(|(k, v, state)| with_map(state, map, |h| h.add(k, v)));
            code(r)
        },
    )?;
    linker.func_wrap("env", "proxy_remove_header_map_value", |mut c: C, map: i32, kp: i32, kl: i32| -> i32 {
        let r = borrow(&mut c, kp, kl).and_then(|(k, state)| with_map(state, map, |h| h.remove(k)));
        code(r)
    })?;
    linker.func_wrap("env", "proxy_get_header_map_size", |mut c: C, map: i32, ret: i32| -> i32 {
        let r = with_map(c.data_mut(), map, |h| Ok(h.byte_size() as u32)).and_then(|n| write_u32(&mut c, ret, n));
        code(r)
    })?;

    // properties
    linker.func_wrap("env", "proxy_get_property", |mut c: C, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32| {
        let value =
            borrow(&mut c, pp, pl).and_then(|(p, state)| crate::properties::get(state, p).ok_or(Status::NotFound));
        status_of(value.map(|v| give(&mut c, &v, ret_ptr, ret_size)))
    })?;
    linker.func_wrap("env", "proxy_set_property", |mut c: C, pp: i32, pl: i32, vp: i32, vl: i32| -> i32 {
        let r = read(&c, pp, pl).and_then(|p| Ok((p, read(&c, vp, vl)?))).and_then(|(p, v)| {
            if crate::properties::set(c.data_mut(), &p, &v) { Ok(()) } else { Err(Status::NotFound) }
        });
        code(r)
    })?;

    // shared data
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| -> wasmtime::Result<i32> {
            let found = borrow(&mut c, kp, kl).and_then(|(k, state)| {
                state.shared.with(k, |e| e.map(|(v, cas)| (v.to_vec(), cas))).ok_or(Status::NotFound)
            });
            let (value, cas) = match found {
                Ok(x) => x,
                Err(s) => return Ok(s.code()),
            };
            match give(&mut c, &value, ret_ptr, ret_size)? {
                Ok(()) => Ok(code(write_u32(&mut c, ret_cas, cas))),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> i32 {
            let r = borrow2(&mut c, (kp, kl), (vp, vl)).and_then(|(k, v, state)| {
                state.shared.set(k, v, cas as u32).map_err(|SetError::CasMismatch| Status::CasMismatch)
            });
            code(r)
        },
    )?;

    // stream control
    for name in ["proxy_continue_request", "proxy_continue_response"] {
        linker.func_wrap("env", name, |mut c: C| -> i32 {
            let ctx = c.data().effective_context;
            c.data_mut().effects.resumed.push(ctx);
            Status::Ok.code()
        })?;
    }
    linker.func_wrap("env", "proxy_continue_stream", |mut c: C, _stream: i32| -> i32 {
        let ctx = c.data().effective_context;
        c.data_mut().effects.resumed.push(ctx);
        Status::Ok.code()
    })?;
    linker.func_wrap("env", "proxy_close_stream", |mut c: C, _stream: i32| -> i32 {
        let state = c.data_mut();
        let parked = state.effective_is_parked();
        match state.stream_mut() {
            Some(s) => {
                s.closed = true;
                if parked {
                    let ctx = state.effective_context;
                    state.effects.resumed.push(ctx);
                }
                Status::Ok.code()
            }
            None => Status::NotFound.code(),
        }
    })?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C, status: i32, dp: i32, dl: i32, bp: i32, bl: i32, hp: i32, hl: i32, _grpc: i32| -> i32 {
            let r = (|| {
                let details = String::from_utf8_lossy(&read(&c, dp, dl)?).into_owned();
                let body = read(&c, bp, bl)?;
                let headers = pairs::decode(&read(&c, hp, hl)?).ok_or(Status::BadArgument)?;
                let status =
                    u16::try_from(status).ok().filter(|s| (100..=999).contains(s)).ok_or(Status::BadArgument)?;
                let state = c.data_mut();
                let parked = state.effective_is_parked();
                let stream = state.stream_mut().ok_or(Status::NotFound)?;
                stream.local_reply = Some(LocalReply { status, details, body, headers, proxy: false });
                if parked {
                    // a paused request answered from a callback: the request waiting for it wakes and sends it
                    let ctx = state.effective_context;
                    state.effects.resumed.push(ctx);
                }
                Ok(())
            })();
            code(r)
        },
    )?;

    // HTTP calls
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C,
         up: i32,
         ul: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         _tp: i32,
         _tl: i32,
         timeout: i32,
         ret: i32|
         -> i32 {
            let r = (|| {
                let cluster = String::from_utf8(read(&c, up, ul)?).map_err(|_| Status::BadArgument)?;
                if !c.data().env.clusters.contains(&cluster) {
                    return Err(Status::BadArgument);
                }
                let headers = pairs::decode(&read(&c, hp, hl)?).ok_or(Status::BadArgument)?;
                for required in [&b":method"[..], b":path", b":authority"] {
                    if !headers.iter().any(|(k, _)| k == required) {
                        return Err(Status::BadArgument);
                    }
                }
                let body = read(&c, bp, bl)?;
                let state = c.data_mut();
                let token = state.next_token;
                state.next_token = state.next_token.wrapping_add(1).max(1);
                let context_id = state.effective_context;
                state.effects.http_calls.push(HttpCall {
                    token,
                    context_id,
                    cluster,
                    headers,
                    body,
                    timeout_ms: timeout as u32,
                });
                write_u32(&mut c, ret, token)
            })();
            code(r)
        },
    )?;

    // metrics
    linker.func_wrap("env", "proxy_define_metric", |mut c: C, kind: i32, np: i32, nl: i32, ret: i32| -> i32 {
        let r = (|| {
            let kind = MetricKind::from_code(kind).ok_or(Status::BadArgument)?;
            let name = String::from_utf8(read(&c, np, nl)?).map_err(|_| Status::BadArgument)?;
            let id = c.data().env.stats.define_custom(kind, &name).map_err(|_| Status::BadArgument)?;
            write_u32(&mut c, ret, id)
        })();
        code(r)
    })?;
    linker.func_wrap("env", "proxy_increment_metric", |mut c: C, id: i32, offset: i64| -> i32 {
        match c.data_mut().metric(id as u32) {
            Some(m) => {
                m.increment(offset);
                Status::Ok.code()
            }
            None => Status::NotFound.code(),
        }
    })?;
    linker.func_wrap("env", "proxy_record_metric", |mut c: C, id: i32, value: i64| -> i32 {
        match c.data_mut().metric(id as u32) {
            Some(m) => {
                m.record(value as u64);
                Status::Ok.code()
            }
            None => Status::NotFound.code(),
        }
    })?;
    linker.func_wrap("env", "proxy_get_metric", |mut c: C, id: i32, ret: i32| -> i32 {
        match c.data_mut().metric(id as u32) {
            Some(m) => code(write_u64(&mut c, ret, m.get() as u64)),
            None => Status::NotFound.code(),
        }
    })?;

    linker.func_wrap("env", "proxy_get_status", |mut c: C, ret_code: i32, ret_ptr: i32, ret_size: i32| {
        if let Err(s) = write_u32(&mut c, ret_code, 0) {
            return Ok(s.code());
        }
        answer(give(&mut c, b"", ret_ptr, ret_size))
    })?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_c: C, _np: i32, _nl: i32, _ap: i32, _al: i32, _rp: i32, _rs: i32| -> i32 { Status::NotFound.code() },
    )?;
    Ok(())
}

/// Every `env` import of `module` that [`add_to_linker`] does not provide (gRPC, shared queues, functions of later
/// ABI versions) answers `Unimplemented` (or zero, for a function without a status result) instead of failing the
/// module's instantiation: the filter learns the host lacks it, as the spec intends.
pub fn define_missing(linker: &mut Linker<HostState>, module: &Module) {
    linker.allow_shadowing(false);
    for import in module.imports() {
        if import.module() != "env" {
            continue;
        }
        let Some(ty) = import.ty().func().cloned() else { continue };
        let name = import.name().to_string();
        let kinds: Vec<ValType> = ty.results().collect();
        let logged = std::sync::atomic::AtomicBool::new(false);
        // fails, changing nothing, for the functions already defined
        let _ = linker.func_new("env", import.name(), ty, move |c, _params, results| {
            // once per module (a linker is per plugin), never silently
            if !logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "wasm {}: the filter called {name}, which this host does not implement; it got Unimplemented \
                     (logged once)",
                    c.data().plugin.name
                );
            }
            for (i, (r, kind)) in results.iter_mut().zip(&kinds).enumerate() {
                *r = match kind {
                    ValType::I32 if i == 0 => Val::I32(Status::Unimplemented.code()),
                    ValType::I64 => Val::I64(0),
                    ValType::F32 => Val::F32(0),
                    ValType::F64 => Val::F64(0),
                    _ => Val::I32(0),
                };
            }
            Ok(())
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_changed_as_envoy_changes_it() {
        let mut b = b"world".to_vec();
        set_body(&mut b, 0, 0, b"hello ").unwrap();
        assert_eq!(b, b"hello world", "start 0, length 0: prepends");
        set_body(&mut b, 0, 11, b"HELLO").unwrap();
        assert_eq!(b, b"HELLO", "start 0, the whole length: replaces");
        set_body(&mut b, 0, 100, b"hi").unwrap();
        assert_eq!(b, b"hi", "a length beyond the end replaces too");
        set_body(&mut b, 2, 0, b"!").unwrap();
        assert_eq!(b, b"hi!", "start at the end: appends");
        set_body(&mut b, 9, 5, b"?").unwrap();
        assert_eq!(b, b"hi!?", "start past the end: appends");
        assert_eq!(set_body(&mut b, 1, 1, b"x"), Err(Status::BadArgument), "a range inside: not Envoy's either");
        assert_eq!(set_body(&mut b, 0, 2, b"x"), Err(Status::BadArgument));
        assert_eq!(b, b"hi!?", "a refused change changes nothing");
    }
}
