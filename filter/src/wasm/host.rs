//! Host access for the core, with every failure handled: shared data, time, properties, headers and logs. A failure
//! becomes `None` or an error value, never a panic (a panic traps the VM).

use super::abi::{self, HeaderMap, LogLevel, Status};
use crate::request::RequestView;
use crate::shared::{SharedError, SharedStore};

/// The host's shared data (Envoy: process-wide, scoped by `vm_id`).
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        abi::shared_data(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        match abi::set_shared_data(key, value, cas.unwrap_or(0)) {
            Ok(()) => Ok(()),
            Err(Status::CAS_MISMATCH) => Err(SharedError::CasMismatch),
            Err(_) => Err(SharedError::Host),
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the host cannot tell).
pub fn now_ms() -> u64 {
    abi::now_nanos().map_or(0, |ns| ns / 1_000_000)
}

pub fn property_string(path: &[&str]) -> Option<String> {
    abi::property(path).and_then(|b| String::from_utf8(b).ok())
}

/// An integer property (the host encodes them as 8 little-endian bytes).
pub fn property_u64(path: &[&str]) -> Option<u64> {
    abi::property(path).and_then(|b| b.get(..8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes))
}

pub fn log(level: LogLevel, message: &str) {
    abi::log(level, &format!("equilibrio: {message}"));
}

pub fn header(map: HeaderMap, name: &str) -> Option<String> {
    abi::header(map, name).and_then(|b| String::from_utf8(b).ok())
}

/// The current request, read lazily from the host.
pub struct HostRequest;

impl RequestView for HostRequest {
    fn header(&self, name: &str) -> Option<String> {
        header(HeaderMap::Request, name)
    }

    fn peer(&self) -> Option<String> {
        property_string(&["source", "address"])
    }
}
