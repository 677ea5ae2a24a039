//! The numbers of the proxy-wasm ABI 0.2.1: status codes, map and buffer types, actions, metric kinds and log
//! levels, as the spec (`abi-versions/v0.2.1/README.md`) and Envoy define them.

/// What a host call returns to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Shorthand for host functions: `Err` carries the status to return.
pub type HostResult = Result<(), Status>;

pub fn code(result: HostResult) -> i32 {
    match result {
        Ok(()) => Status::Ok.code(),
        Err(s) => s.code(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub fn from_code(code: i32) -> Option<MapType> {
        Some(match code {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            4 => MapType::GrpcInitialMetadata,
            5 => MapType::GrpcTrailingMetadata,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    HttpCallResponseBody,
    GrpcReceiveBuffer,
    VmConfiguration,
    PluginConfiguration,
    CallData,
}

impl BufferType {
    pub fn from_code(code: i32) -> Option<BufferType> {
        Some(match code {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcReceiveBuffer,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            _ => return None,
        })
    }
}

/// What a stream callback asks of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    /// Envoy's header statuses: `StopIteration` (1) and `StopAllIterationAndBuffer`/`AndWatermark` (3, 4) pause;
    /// `Continue` (0) and `ContinueAndDontEndStream` (2) go on.
    pub fn from_code(code: i32) -> Action {
        if matches!(code, 1 | 3 | 4) { Action::Pause } else { Action::Continue }
    }
}

/// What a body callback asks of the host (Envoy's `FilterDataStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataAction {
    /// Pass what the filter holds on to the next filter.
    Continue,
    /// Hold the data and call again with more; the buffer is bounded (413 for a request, 500 for a response).
    StopIterationAndBuffer,
    /// Hold the data and stop reading more once the buffer is full, until the filter resumes the stream.
    StopIterationAndWatermark,
    /// Drop the data (the filter took what it wanted).
    StopIterationNoBuffer,
}

impl DataAction {
    pub fn from_code(code: i32) -> DataAction {
        match code {
            1 => DataAction::StopIterationAndBuffer,
            2 => DataAction::StopIterationAndWatermark,
            3 => DataAction::StopIterationNoBuffer,
            _ => DataAction::Continue,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub fn from_code(code: i32) -> Option<MetricKind> {
        Some(match code {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return None,
        })
    }
}

/// proxy-wasm log levels: trace 0 … critical 5.
pub fn log_level_code(level: crate::config::LogLevel) -> i32 {
    use crate::config::LogLevel::*;
    match level {
        Trace => 0,
        Debug => 1,
        Info => 2,
        Warn => 3,
        Error => 4,
    }
}

/// Envoy's response-flag bits that filters read through the `response.flags` property.
pub mod response_flags {
    /// No healthy upstream (UH).
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2;
    /// Upstream request timeout (UT).
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    /// Upstream remote reset (UR).
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10;
    /// Upstream connection failure (UF).
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
    /// Upstream connection termination (UC).
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40;
    /// Upstream overflow / too many connections (UO).
    pub const UPSTREAM_OVERFLOW: u64 = 0x80;
    /// Downstream protocol error (DPE): the client's request was malformed.
    pub const DOWNSTREAM_PROTOCOL_ERROR: u64 = 0x40000;
}
