//! A request or response body through the filters' body callbacks (`proxy_on_request_body`,
//! `proxy_on_response_body`), with Envoy's buffering semantics: each filter holds what it buffered
//! (`StopIterationAndBuffer`, `StopIterationAndWatermark`) and is called again with the new data appended, reading and
//! changing it through the body buffer; `Continue` passes what it holds to the next filter (the response direction runs
//! the filters in reverse order); `StopIterationNoBuffer` drops it. A buffer beyond the limit is an overflow (Envoy
//! answers 413 for a request, 500 or a reset for a response). A filter that stops at the end of the body (or at its
//! watermark) waits to be resumed by its callbacks.
//!
//! Only requests whose filters export a body callback come here: the others stream through untouched.

use bytes::Bytes;

use crate::context::LocalReply;
use crate::stream_end::{FilterContext, StreamGuard};
use crate::vm::DataAction;

/// What a run through the filters gave.
#[derive(Debug)]
pub enum Step {
    /// Data that passed every filter of the range (possibly empty).
    Forward(Bytes),
    /// A filter holds the data; nothing passes yet.
    Held,
    /// The filter at this position (in the direction's order) stopped and must be resumed before what it holds goes on.
    Wait(usize),
    /// The stream ends here.
    End(Ending),
}

/// How body filters end a stream.
#[derive(Debug)]
pub enum Ending {
    /// A filter answered locally.
    Reply(LocalReply),
    /// A filter closed the stream, or its VM failed.
    Close,
    /// A buffer grew beyond the limit.
    Overflow,
}

pub struct BodyFilters {
    response: bool,
    limit: usize,
    /// What each filter holds, in the direction's order.
    held: Vec<Vec<u8>>,
}

impl BodyFilters {
    pub fn new(filters: usize, response: bool, limit: usize) -> BodyFilters {
        BodyFilters { response, limit, held: vec![Vec::new(); filters] }
    }

    /// Whether the body callbacks run for responses.
    pub fn is_response(&self) -> bool {
        self.response
    }

    /// The filter context at `position` (in the direction's order).
    pub fn context_at(&self, guard: &StreamGuard, position: usize) -> Option<FilterContext> {
        let n = guard.filters().len();
        let index = if self.response { n.checked_sub(position + 1)? } else { position };
        guard.filters().get(index).cloned()
    }

    /// What the filter at `position` holds, taken (to resume it: run the next filters with it).
    pub fn take_held(&mut self, position: usize) -> Vec<u8> {
        self.held.get_mut(position).map(std::mem::take).unwrap_or_default()
    }

    /// Everything every filter holds, in order (the stream ends with trailers: what was held goes on).
    pub fn take_all(&mut self) -> Vec<u8> {
        self.held.iter_mut().flat_map(std::mem::take).collect()
    }

    /// Runs `data` through the filters at positions `from..to` (the direction's order).
    pub fn run(&mut self, guard: &mut StreamGuard, from: usize, to: usize, data: Vec<u8>, end_of_stream: bool) -> Step {
        let mut data = data;
        let n = guard.filters().len();
        for position in from..to.min(n) {
            let Some((slot, context, generation)) = self.context_at(guard, position) else { break };
            if slot.generation() != generation {
                continue; // its VM trapped since: the data goes past it
            }
            let Some(held) = self.held.get_mut(position) else { break };
            held.extend_from_slice(&data);
            let response = self.response;
            let action = slot.call(|vm| {
                if !vm.exports_body(response) {
                    return Ok(DataAction::Continue);
                }
                vm.on_body(context, &mut guard.stream, response, held, end_of_stream)
            });
            let Ok(action) = action else { return Step::End(Ending::Close) };
            if let Some(s) = guard.stream.as_deref_mut() {
                if let Some(r) = s.local_reply.take() {
                    return Step::End(Ending::Reply(r));
                }
                if s.closed {
                    return Step::End(Ending::Close);
                }
            }
            match action {
                DataAction::Continue => data = std::mem::take(held),
                DataAction::StopIterationAndBuffer if held.len() > self.limit => return Step::End(Ending::Overflow),
                DataAction::StopIterationAndWatermark if held.len() > self.limit => return Step::Wait(position),
                DataAction::StopIterationAndBuffer | DataAction::StopIterationAndWatermark => {
                    return if end_of_stream { Step::Wait(position) } else { Step::Held };
                }
                DataAction::StopIterationNoBuffer => {
                    held.clear();
                    return if end_of_stream { Step::Wait(position) } else { Step::Held };
                }
            }
        }
        Step::Forward(Bytes::from(data))
    }
}

/// The local reply for a request body beyond the buffer limit, as Envoy's.
pub fn payload_too_large() -> LocalReply {
    LocalReply {
        status: 413,
        details: "request_payload_too_large".into(),
        body: b"Payload Too Large".to_vec(),
        headers: vec![],
        proxy: true,
    }
}

/// The local reply for a response body beyond the buffer limit before its head was sent, as Envoy's.
pub fn response_too_large() -> LocalReply {
    LocalReply {
        status: 500,
        details: "response_payload_too_large".into(),
        body: b"Internal Server Error".to_vec(),
        headers: vec![],
        proxy: true,
    }
}
