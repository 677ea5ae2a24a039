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

/// The guest's bytes at `ptr` and the VM's state, borrowed together: no copy on the request path.
pub fn borrow<'a>(c: &'a mut C, ptr: i32, len: i32) -> Result<(&'a [u8], &'a mut HostState), Status> {
    borrow2(c, (ptr, len), (0, 0)).map(|(a, _, state)| (a, state))
}

/// Two byte ranges of guest memory (a key and a value) and the VM's state, borrowed together.
pub fn borrow2<'a>(
    c: &'a mut C,
    (p1, l1): (i32, i32),
    (p2, l2): (i32, i32),
) -> Result<(&'a [u8], &'a [u8], &'a mut HostState), Status> {
    let mem = c.data().memory.ok_or(Status::InternalFailure)?;
    let (data, state) = mem.data_and_store_mut(c);
    let data: &'a [u8] = data;
    let a = data.get(range(p1, l1 as u32 as usize)?).ok_or(Status::InvalidMemoryAccess)?;
    let b = data.get(range(p2, l2 as u32 as usize)?).ok_or(Status::InvalidMemoryAccess)?;
    Ok((a, b, state))
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
/// pointers (no bytes: no allocation, address 0, as in Envoy). The outer error is a trap inside the guest's allocator, which must propagate.
pub fn give(c: &mut C, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> wasmtime::Result<Result<(), Status>> {
    if bytes.is_empty() {
        // as Envoy's host: nothing is allocated for nothing; the guest gets a null pointer and a zero size
        return Ok(write_u32(c, ret_ptr, 0).and_then(|()| write_u32(c, ret_size, 0)));
    }
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
