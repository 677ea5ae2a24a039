//! Guest memory access for host functions: bounds-checked reads and writes, and handing bytes to the guest in memory
//! it allocates (`proxy_on_memory_allocate`, or `malloc`), as the ABI's `return_*` pointer pairs require.

use wasmtime::Caller;

use super::types::Status;
use crate::context::HostState;

pub type C<'a> = Caller<'a, HostState>;

fn range(ptr: i32, len: usize) -> Result<std::ops::Range<usize>, Status> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    Ok(start..end)
}

/// Copies `len` bytes at `ptr` out of the guest.
pub fn read(c: &C, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = c.data().memory.ok_or(Status::InternalFailure)?;
    let r = range(ptr, len as u32 as usize)?;
    mem.data(c).get(r).map(<[u8]>::to_vec).ok_or(Status::InvalidMemoryAccess)
}

pub fn write(c: &mut C, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let mem = c.data().memory.ok_or(Status::InternalFailure)?;
    let r = range(ptr, bytes.len())?;
    let dst = mem.data_mut(c).get_mut(r).ok_or(Status::InvalidMemoryAccess)?;
    dst.copy_from_slice(bytes);
    Ok(())
}

pub fn write_u32(c: &mut C, ptr: i32, v: u32) -> Result<(), Status> {
    write(c, ptr, &v.to_le_bytes())
}

pub fn write_u64(c: &mut C, ptr: i32, v: u64) -> Result<(), Status> {
    write(c, ptr, &v.to_le_bytes())
}

pub fn read_u32(c: &C, ptr: i32) -> Result<u32, Status> {
    let b = read(c, ptr, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Allocates `bytes.len()` in the guest, copies `bytes` there and writes the address and size to the return
/// pointers. The outer error is a trap inside the guest's allocator, which must propagate.
pub fn give(c: &mut C, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> wasmtime::Result<Result<(), Status>> {
    let Some(malloc) = c.data().malloc.clone() else { return Ok(Err(Status::InternalFailure)) };
    let Ok(len) = i32::try_from(bytes.len()) else { return Ok(Err(Status::BadArgument)) };
    let addr = malloc.call(&mut *c, len)?;
    if addr == 0 && len > 0 {
        return Ok(Err(Status::InternalFailure));
    }
    Ok(write(c, addr, bytes)
        .and_then(|()| write_u32(c, ret_ptr, addr as u32))
        .and_then(|()| write_u32(c, ret_size, len as u32)))
}
