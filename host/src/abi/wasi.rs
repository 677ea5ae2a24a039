//! WASI preview 1 for filters, from wasmtime-wasi: clocks, random numbers, environment and arguments (empty),
//! `proc_exit`. Filters get no files and no sockets. Their stdout and stderr go to the proxy's log line by line, as
//! Envoy does; the file-descriptor functions are replaced with synchronous ones because wasmtime-wasi's run them on
//! a nested Tokio runtime, which cannot start inside our workers' event loops. Modules built for WASI's older name,
//! `wasi_unstable` (AssemblyScript's proxy-wasm SDK, older toolchains), get the same functions under it, as Envoy
//! gives them (where the two versions differ, in file-status layouts, there are no files to tell).

use wasmtime::{Linker, Module, Val, ValType};

use super::memory::{C, read, read_u32, write_u32};
use crate::context::HostState;

const MODULE: &str = "wasi_snapshot_preview1";
/// WASI's name before preview 1.
const UNSTABLE: &str = "wasi_unstable";
/// `EBADF`: what every replaced file-descriptor function answers (there are no files).
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;

/// The functions wasmtime-wasi implements through its async path.
const REPLACED: &[&str] = &[
    "fd_advise",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_read",
    "fd_pread",
    "fd_seek",
    "fd_sync",
    "fd_readdir",
    "fd_pwrite",
    "poll_oneoff",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "fd_renumber",
];

pub fn add_to_linker(linker: &mut Linker<HostState>, module: &Module) -> wasmtime::Result<()> {
    wasmtime_wasi::p1::add_to_linker_sync(linker, |s: &mut HostState| &mut s.wasi)?;
    linker.allow_shadowing(true);
    linker.func_wrap(MODULE, "fd_write", fd_write)?;
    for import in module.imports() {
        if import.module() != MODULE || !REPLACED.contains(&import.name()) {
            continue;
        }
        let Some(ty) = import.ty().func().cloned() else { continue };
        let kinds: Vec<ValType> = ty.results().collect();
        linker.func_new(MODULE, import.name(), ty, move |_c, _p, results| {
            for (r, kind) in results.iter_mut().zip(&kinds) {
                *r = if matches!(kind, ValType::I64) { Val::I64(0) } else { Val::I32(ERRNO_BADF) };
            }
            Ok(())
        })?;
    }
    for import in module.imports() {
        if import.module() == UNSTABLE && import.ty().func().is_some() {
            // an unknown name stays unknown: instantiation names it
            let _ = linker.alias(MODULE, import.name(), UNSTABLE, import.name());
        }
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// `fd_write` to stdout (1) or stderr (2): complete lines go to the log.
fn fd_write(mut c: C, fd: i32, iovs: i32, count: i32, ret_written: i32) -> i32 {
    if fd != 1 && fd != 2 {
        return ERRNO_BADF;
    }
    let mut written = 0u32;
    for i in 0..count.clamp(0, 1024) {
        let at = iovs.wrapping_add(i * 8);
        let Ok(ptr) = read_u32(&c, at) else { return ERRNO_FAULT };
        let Ok(len) = read_u32(&c, at.wrapping_add(4)) else { return ERRNO_FAULT };
        let Ok(bytes) = read(&c, ptr as i32, len as i32) else { return ERRNO_FAULT };
        written = written.wrapping_add(len);
        c.data_mut().stdio_line.extend_from_slice(&bytes);
    }
    let level = if fd == 2 { 4 } else { 2 };
    loop {
        let state = c.data_mut();
        let Some(end) = state.stdio_line.iter().position(|b| *b == b'\n') else { break };
        let line: Vec<u8> = state.stdio_line.drain(..=end).collect();
        state.log_line(level, String::from_utf8_lossy(&line).trim_end());
    }
    // a runaway line without a newline is logged in pieces rather than kept forever
    if c.data().stdio_line.len() > 16 * 1024 {
        let line = std::mem::take(&mut c.data_mut().stdio_line);
        c.data().log_line(level, &String::from_utf8_lossy(&line));
    }
    if write_u32(&mut c, ret_written, written).is_err() {
        return ERRNO_FAULT;
    }
    0
}
