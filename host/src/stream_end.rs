//! The end of a stream for the filters: when the response is done, or the request is abandoned at any point (the
//! client went away while the upstream was still working on it), each filter that saw the stream gets `proxy_on_log`,
//! `proxy_on_done` and `proxy_on_delete` (those it exports), with the request and response heads still readable. The
//! guard owns the stream from its first callback, so that dropping it is the end in every case.

use std::rc::Rc;

use crate::context::Stream;
use crate::driver::VmSlot;

/// A filter's context for the stream: its VM, the context id, and the VM generation that created it.
pub type FilterContext = (Rc<VmSlot>, u32, u64);

pub struct StreamGuard {
    filters: Vec<FilterContext>,
    pub stream: Option<Box<Stream>>,
    /// Where the stream is parked while a filter holds it paused (see [`crate::driver`]).
    parked: Option<(Rc<VmSlot>, u32)>,
}

impl StreamGuard {
    pub fn new() -> StreamGuard {
        StreamGuard { filters: Vec::with_capacity(1), stream: None, parked: None }
    }

    /// Parks the stream with the filter context that paused it, so that the filter's callbacks reach it.
    pub fn park(&mut self, slot: &Rc<VmSlot>, context: u32) {
        if let Some(s) = self.stream.take() {
            slot.park(context, s);
            self.parked = Some((slot.clone(), context));
        }
    }

    /// Takes the stream back from where it is parked.
    pub fn unpark(&mut self) {
        if let Some((slot, context)) = self.parked.take() {
            self.stream = slot.unpark(context);
        }
    }

    pub fn filters(&self) -> &[FilterContext] {
        &self.filters
    }

    /// A filter created `context` for this stream in VM generation `generation`.
    pub fn push(&mut self, slot: Rc<VmSlot>, context: u32, generation: u64) {
        self.filters.push((slot, context, generation));
    }

    /// The stream and the filter contexts that saw it, borrowed together.
    pub fn parts(&mut self) -> (&mut Option<Box<Stream>>, &[FilterContext]) {
        (&mut self.stream, &self.filters)
    }
}

impl Default for StreamGuard {
    fn default() -> Self {
        StreamGuard::new()
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // a request abandoned while paused: its stream comes back from the filter's slot for the end callbacks
        self.unpark();
        for (slot, context, generation) in std::mem::take(&mut self.filters) {
            // a context of a VM that trapped since is gone with it
            if slot.generation() == generation && self.stream.is_some() {
                let _ = slot.call(|vm| vm.finish_stream(context, &mut self.stream));
            }
        }
    }
}
