//! Client connection timeouts on a coarse per-worker clock, instead of a timer per request (hyper's own header-read
//! timer arms one per request: a measurable share of a proxy's CPU, docs/performance-tuning.md#the-bundled-proxy). Each connection's [`ConnState`] is updated with a few `Cell`
//! writes as bytes and requests come and go; once a second the worker's [`Sweeper`] closes connections that have
//! spent too long reading a request head (slowloris) or sitting idle between requests: never before the configured
//! time, at most a second after it. The sweeper also tells every connection to drain at shutdown. Either signal
//! reaches the connection's task through [`ConnState::watch`], which costs a pointer comparison per poll (a
//! `select!` over notifications polled every branch on every wake-up).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in flight and no byte of the next one.
    Idle,
    /// Bytes of a request head arrived; the head is not complete.
    ReadingHead,
    /// At least one request is being served.
    Busy,
}

/// The timing state of one client connection.
pub struct ConnState {
    clock: Rc<Cell<u32>>,
    phase: Cell<Phase>,
    since: Cell<u32>,
    in_flight: Cell<u32>,
    /// HTTP/2 sends frames between requests: only the idle timeout applies.
    http2: Cell<bool>,
    first_read: Cell<bool>,
    /// Set when the worker decides the connection must end.
    close: Cell<Option<Close>>,
    /// The connection task's waker, to deliver `close`.
    waker: RefCell<Option<Waker>>,
}

/// Why the worker ends a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Too slow a request head, or idle too long: closed at once.
    Expired,
    /// Shutdown: finish what is in flight, then close.
    Drain,
}

/// How [`ConnState::watch`] ended.
pub enum Watched<T> {
    Done(T),
    Close(Close),
}

impl ConnState {
    fn new(clock: Rc<Cell<u32>>) -> ConnState {
        let now = clock.get();
        ConnState {
            clock,
            phase: Cell::new(Phase::Idle),
            since: Cell::new(now),
            in_flight: Cell::new(0),
            http2: Cell::new(false),
            first_read: Cell::new(true),
            close: Cell::new(None),
            waker: RefCell::new(None),
        }
    }

    fn signal(&self, why: Close) {
        self.close.set(Some(why));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Runs the connection future until it ends or the worker signals it to close.
    pub async fn watch<F: Future + Unpin>(&self, mut conn: F) -> Watched<F::Output> {
        std::future::poll_fn(|cx| {
            if let Some(why) = self.close.get() {
                return Poll::Ready(Watched::Close(why));
            }
            {
                let mut w = self.waker.borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
            }
            Pin::new(&mut conn).poll(cx).map(Watched::Done)
        })
        .await
    }

    pub fn bytes_read(&self, first: &[u8]) {
        if self.first_read.replace(false) && first.starts_with(b"PRI * HTTP/2") {
            self.http2.set(true);
        }
        if self.phase.get() == Phase::Idle && !self.http2.get() {
            self.phase.set(Phase::ReadingHead);
            self.since.set(self.clock.get());
        }
    }

    /// A request head is complete and the request is being served.
    pub fn request_started(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.phase.set(Phase::Busy);
    }

    /// A response is complete (or abandoned).
    pub fn request_done(&self) {
        let n = self.in_flight.get().saturating_sub(1);
        self.in_flight.set(n);
        if n == 0 {
            self.phase.set(Phase::Idle);
            self.since.set(self.clock.get());
        }
    }

    fn is_expired(&self, now: u32, head: u32, idle: u32) -> bool {
        let waited = now.saturating_sub(self.since.get());
        match self.phase.get() {
            // strictly more: never before the configured time, at most a second after
            Phase::ReadingHead => waited > head,
            Phase::Idle => waited > idle,
            Phase::Busy => false,
        }
    }
}

/// A worker's connections and its coarse clock.
pub struct Sweeper {
    clock: Rc<Cell<u32>>,
    conns: RefCell<HashMap<u64, Rc<ConnState>>>,
    next_id: Cell<u64>,
    head_timeout: u32,
    idle_timeout: u32,
}

/// Seconds, rounded up, at least 1.
fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1)
}

impl Sweeper {
    pub fn new(head_timeout: Duration, idle_timeout: Duration) -> Rc<Sweeper> {
        Rc::new(Sweeper {
            clock: Rc::new(Cell::new(0)),
            conns: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
            head_timeout: secs(head_timeout),
            idle_timeout: secs(idle_timeout),
        })
    }

    /// Tracks a new connection; `forget` it when the connection ends.
    pub fn track(&self) -> (u64, Rc<ConnState>) {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let state = Rc::new(ConnState::new(self.clock.clone()));
        self.conns.borrow_mut().insert(id, state.clone());
        (id, state)
    }

    pub fn forget(&self, id: u64) {
        self.conns.borrow_mut().remove(&id);
    }

    /// Advances the clock by one second and expires what has waited too long.
    pub fn tick(&self) {
        let now = self.clock.get() + 1;
        self.clock.set(now);
        for state in self.conns.borrow().values() {
            if state.is_expired(now, self.head_timeout, self.idle_timeout) {
                state.signal(Close::Expired);
            }
        }
    }

    /// Tells every connection to finish what is in flight and close (shutdown).
    pub fn drain_all(&self) {
        for state in self.conns.borrow().values() {
            state.signal(Close::Drain);
        }
    }

    /// Ticks once a second for as long as the worker runs.
    pub async fn run(self: Rc<Self>) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            self.tick();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn sweeper() -> Rc<Sweeper> {
        Sweeper::new(Duration::from_secs(2), Duration::from_secs(5))
    }

    #[test]
    fn a_slow_request_head_expires_after_the_header_timeout() {
        let s = sweeper();
        let (_, c) = s.track();
        c.bytes_read(b"GET / HT");
        s.tick();
        s.tick();
        assert!(!c.is_expired(s.clock.get(), 2, 5), "never before the timeout");
        s.tick();
        assert!(c.is_expired(s.clock.get(), 2, 5), "past 2 s into a head");
    }

    #[test]
    fn a_request_in_flight_never_expires_and_idle_connections_do() {
        let s = sweeper();
        let (_, c) = s.track();
        c.bytes_read(b"GET / HTTP/1.1\r\n\r\n");
        c.request_started();
        for _ in 0..10 {
            s.tick();
        }
        assert!(!c.is_expired(s.clock.get(), 2, 5), "busy");
        c.request_done();
        for _ in 0..5 {
            s.tick();
        }
        assert!(!c.is_expired(s.clock.get(), 2, 5));
        s.tick();
        assert!(c.is_expired(s.clock.get(), 2, 5), "idle past 5 s");
    }

    #[tokio::test]
    async fn watch_ends_on_the_signal_and_passes_the_output_through() {
        let s = sweeper();
        let (_, c) = s.track();
        let pending = c.watch(std::future::pending::<()>());
        tokio::pin!(pending);
        assert!(futures_poll_once(pending.as_mut()).await.is_none(), "nothing signalled yet");
        s.drain_all();
        assert!(matches!(pending.await, Watched::Close(Close::Drain)));
        let (_, d) = s.track();
        assert!(matches!(d.watch(std::future::ready(7)).await, Watched::Done(7)));
    }

    /// Polls once; `None` when pending.
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }

    #[test]
    fn http2_connections_get_only_the_idle_timeout() {
        let s = sweeper();
        let (id, c) = s.track();
        c.bytes_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        for _ in 0..4 {
            s.tick();
            c.bytes_read(b"ping");
        }
        assert!(!c.is_expired(s.clock.get(), 2, 5));
        s.forget(id);
        assert!(s.conns.borrow().is_empty());
    }
}
