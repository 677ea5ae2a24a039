//! The proxy-wasm ABI 0.2.1, guest side: the host functions the filter imports, each behind a safe wrapper that turns
//! the host's status into a `Result`, and the allocator the host uses to hand data back.
//!
//! Why not the SDK (`proxy-wasm` crate): it exports every callback of the ABI, and Envoy enters the VM for every
//! exported callback of every request (a response-body callback, `on_done`, `on_delete`, ... that do nothing here).
//! Each entry costs Envoy more CPU than most of what the filter itself does (`BENCH_PROBE=1 scripts/bench` prices it;
//! docs/performance-tuning.md#the-filter-in-envoy), so the filter exports only the callbacks it uses (see [`super`]). This module is the only `unsafe` code of the filter: raw pointers cross the
//! VM boundary here and nowhere else.
#![allow(unsafe_code)]

use std::time::Duration;

/// A host status other than `Ok` (the ABI's `WasmResult`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

impl Status {
    pub const CAS_MISMATCH: Status = Status(8);
}

fn check(status: u32) -> Result<(), Status> {
    if status == 0 { Ok(()) } else { Err(Status(status)) }
}

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum LogLevel {
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// The header maps the filter reads or writes.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum HeaderMap {
    Request = 0,
    Response = 2,
    /// The answer to an HTTP call (the poller's).
    CallResponse = 6,
}

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum BufferType {
    HttpCallResponseBody = 4,
    PluginConfiguration = 7,
}

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, message: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(ret_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ret: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        ret: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(path: *const u8, path_size: usize, ret: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        ret: *mut *mut u8,
        ret_size: *mut usize,
        ret_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_http_call(
        upstream: *const u8,
        upstream_size: usize,
        headers: *const u8,
        headers_size: usize,
        body: *const u8,
        body_size: usize,
        trailers: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        ret_token: *mut u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, ret_id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
}

unsafe extern "C" {
    /// The linker's constructor list for this module (a reactor runs it in `_initialize`).
    fn __wasm_call_ctors();
}

/// A reactor module's initialization, which hosts call before anything else.
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    // SAFETY: called once by the host before any other export, as the WASI reactor convention requires
    unsafe { __wasm_call_ctors() };
}

/// The host allocates the data it returns through this export, then hands over the pointer and size; [`take`] makes
/// it a `Vec` again. `Vec::with_capacity(n)` of bytes allocates exactly `n`, so the layouts match.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buffer = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
    buffer.as_mut_ptr()
}

/// Takes ownership of data the host returned (allocated by [`proxy_on_memory_allocate`]).
fn take(ptr: *mut u8, size: usize) -> Option<Vec<u8>> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the host allocated `ptr` with `proxy_on_memory_allocate(size)` and wrote `size` bytes into it
    Some(unsafe { Vec::from_raw_parts(ptr, size, size) })
}

/// Runs a host call that returns data: `Ok(None)` when the host has none (`NotFound`, or no buffer).
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, Status> {
    let mut ptr: *mut u8 = std::ptr::null_mut();
    let mut size = 0usize;
    match call(&mut ptr, &mut size) {
        0 => Ok(take(ptr, size)),
        1 => Ok(None),
        other => Err(Status(other)),
    }
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY (every call below): the pointers come from live slices and locals that outlive the call
    unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// The host's wall clock.
pub fn now_nanos() -> Option<u64> {
    let mut t = 0u64;
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) }).ok().map(|()| t)
}

pub fn set_tick_period(period: Duration) {
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    unsafe { proxy_set_tick_period_milliseconds(ms) };
}

pub fn buffer(kind: BufferType, max: usize) -> Option<Vec<u8>> {
    returned(|p, s| unsafe { proxy_get_buffer_bytes(kind as u32, 0, max, p, s) }).ok().flatten()
}

pub fn header(map: HeaderMap, name: &str) -> Option<Vec<u8>> {
    returned(|p, s| unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), p, s) }).ok().flatten()
}

/// Sets a header, replacing any value it had (`None`: removes it).
pub fn set_header(map: HeaderMap, name: &str, value: Option<&str>) {
    match value {
        Some(v) => unsafe {
            proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), v.as_ptr(), v.len())
        },
        None => unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) },
    };
}

pub fn add_header(map: HeaderMap, name: &str, value: &str) {
    unsafe { proxy_add_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

/// A property by path (the ABI joins the path's parts with NUL bytes).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let joined = path.join("\0");
    returned(|p, s| unsafe { proxy_get_property(joined.as_ptr(), joined.len(), p, s) }).ok().flatten()
}

/// A shared-data value and its CAS token.
pub fn shared_data(key: &str) -> Option<(Vec<u8>, u32)> {
    let mut cas = 0u32;
    let value = returned(|p, s| unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), p, s, &mut cas) });
    value.ok().flatten().map(|v| (v, cas))
}

/// Writes a shared-data value; `cas` 0 writes unconditionally.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

fn encode_str_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    equilibrio_contract::pairs::encode(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
}

/// Answers the request from the filter (the host sends it once the callback returns).
pub fn send_local_response(status: u32, headers: &[(&str, &str)], body: &[u8]) {
    let headers = encode_str_pairs(headers);
    unsafe {
        proxy_send_local_response(
            status,
            [].as_ptr(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    };
}

/// Starts an HTTP call to a cluster; the answer arrives in `proxy_on_http_call_response` with the returned token.
pub fn http_call(cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> Result<u32, Status> {
    let headers = encode_str_pairs(headers);
    let trailers = equilibrio_contract::pairs::encode(std::iter::empty());
    let timeout = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let mut token = 0u32;
    check(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            timeout,
            &mut token,
        )
    })
    .map(|()| token)
}

pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) }).map(|()| id)
}

pub fn increment_metric(id: u32, by: i64) {
    unsafe { proxy_increment_metric(id, by) };
}

pub fn record_metric(id: u32, value: u64) {
    unsafe { proxy_record_metric(id, value) };
}
