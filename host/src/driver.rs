//! Drives one VM on one thread: starts it, re-creates it after a trap (as Envoy's fail-reload does), runs its tick
//! timer, makes the HTTP calls it dispatches and delivers their answers, and wakes streams it resumes. Every call
//! into the VM goes through [`VmSlot::call`], which applies the call's effects once the VM is released.
//!
//! A stream a filter paused is parked here ([`VmSlot::park`]) while its request waits, so that the filter's HTTP-call
//! and tick callbacks can read and change it, answer it locally or resume it, as in Envoy.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use wasmtime::Engine;

use crate::config::ClusterConfig;
use crate::context::{Effects, Env, HttpCall, Parked, Stream};
use crate::stats::Metric;
use crate::vm::{Plugin, StartError, Trap, Vm};

pub struct VmSlot {
    engine: Engine,
    plugin: Arc<Plugin>,
    env: Arc<Env>,
    clusters: Arc<BTreeMap<String, ClusterConfig>>,
    vm: RefCell<Option<Vm>>,
    generation: Cell<u64>,
    tick_ms: Cell<u32>,
    tick_changed: Notify,
    waiters: RefCell<HashMap<u32, oneshot::Sender<()>>>,
    resumed_early: RefCell<HashSet<u32>>,
    parked: RefCell<Parked>,
    restarts: Arc<Metric>,
}

impl VmSlot {
    /// Starts the VM now, so that a refused configuration stops the proxy at start.
    pub fn start(
        engine: &Engine,
        plugin: Arc<Plugin>,
        env: Arc<Env>,
        clusters: Arc<BTreeMap<String, ClusterConfig>>,
    ) -> Result<Rc<VmSlot>, StartError> {
        let vm = Vm::start(engine, &plugin, env.clone())?;
        let restarts =
            env.stats.handle(crate::abi::types::MetricKind::Counter, &format!("wasm.{}.vm_restarts", plugin.info.name));
        let slot = Rc::new(VmSlot {
            engine: engine.clone(),
            plugin,
            env,
            clusters,
            vm: RefCell::new(Some(vm)),
            generation: Cell::new(0),
            tick_ms: Cell::new(0),
            tick_changed: Notify::new(),
            waiters: RefCell::new(HashMap::new()),
            resumed_early: RefCell::new(HashSet::new()),
            parked: RefCell::new(Parked::new()),
            restarts,
        });
        slot.apply_pending();
        Ok(slot)
    }

    pub fn name(&self) -> &str {
        &self.plugin.info.name
    }

    /// Bumped each time the VM is replaced: contexts of an older generation are gone.
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    /// Calls into the VM (re-creating it first if the last call trapped), then applies what the call asked for.
    pub fn call<R>(self: &Rc<Self>, f: impl FnOnce(&mut Vm) -> Result<R, Trap>) -> Result<R, Trap> {
        let (result, effects) = {
            let Ok(mut guard) = self.vm.try_borrow_mut() else {
                return Err(Trap("re-entrant call into the VM".into()));
            };
            if guard.is_none() {
                match Vm::start(&self.engine, &self.plugin, self.env.clone()) {
                    Ok(vm) => {
                        tracing::warn!("wasm VM of {} re-created after a trap", self.name());
                        *guard = Some(vm);
                    }
                    Err(e) => return Err(Trap(format!("re-creating the VM: {e}"))),
                }
            }
            let Some(vm) = guard.as_mut() else { return Err(Trap("no VM".into())) };
            let result = f(vm);
            let effects = vm.take_effects();
            if let Err(trap) = &result {
                tracing::error!("wasm VM of {} trapped; it will be re-created: {trap}", self.name());
                self.restarts.inc();
                *guard = None;
                self.generation.set(self.generation.get() + 1);
                // the streams it paused wake, see the new generation and fail at once rather than at their timeout
                for (_, tx) in self.waiters.borrow_mut().drain() {
                    let _ = tx.send(());
                }
            }
            (result, effects)
        };
        self.apply(effects);
        result
    }

    /// [`VmSlot::call`] with the paused streams in the VM's reach (HTTP-call and tick callbacks).
    fn call_parked(self: &Rc<Self>, f: impl FnOnce(&mut Vm, &mut Parked) -> Result<(), Trap>) -> Result<(), Trap> {
        let Ok(mut parked) = self.parked.try_borrow_mut() else {
            return Err(Trap("re-entrant call into the VM".into()));
        };
        let mut taken = std::mem::take(&mut *parked);
        drop(parked);
        let r = self.call(|vm| f(vm, &mut taken));
        if let Ok(mut parked) = self.parked.try_borrow_mut() {
            // streams parked meanwhile (none can be: the call is synchronous) are kept too
            taken.extend(parked.drain());
            *parked = taken;
        }
        r
    }

    /// Parks a paused stream (see the module's comment) until [`VmSlot::unpark`].
    pub fn park(&self, context: u32, stream: Box<Stream>) {
        self.parked.borrow_mut().insert(context, stream);
    }

    pub fn unpark(&self, context: u32) -> Option<Box<Stream>> {
        self.parked.borrow_mut().remove(&context)
    }

    fn apply_pending(self: &Rc<Self>) {
        let effects = self.vm.borrow_mut().as_mut().map(Vm::take_effects).unwrap_or_default();
        self.apply(effects);
    }

    fn apply(self: &Rc<Self>, effects: Effects) {
        if effects.is_empty() {
            return;
        }
        if let Some(ms) = effects.tick_period_ms {
            self.tick_ms.set(ms);
            self.tick_changed.notify_one();
        }
        for call in effects.http_calls {
            let slot = self.clone();
            tokio::task::spawn_local(async move { slot.http_call(call).await });
        }
        for context in effects.resumed {
            match self.waiters.borrow_mut().remove(&context) {
                Some(tx) => {
                    let _ = tx.send(());
                }
                None => {
                    self.resumed_early.borrow_mut().insert(context);
                }
            }
        }
    }

    async fn http_call(self: Rc<Self>, call: HttpCall) {
        let generation = self.generation();
        let response = crate::http_call::execute(self.clusters.get(&call.cluster), &call).await;
        if self.generation() != generation {
            return; // the VM that asked is gone
        }
        let _ = self.call_parked(|vm, parked| vm.on_http_call_response(call.context_id, call.token, response, parked));
    }

    /// Runs the VM's tick timer for as long as the thread runs.
    pub async fn run_ticks(self: Rc<Self>) {
        loop {
            let ms = self.tick_ms.get();
            if ms == 0 {
                self.tick_changed.notified().await;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(u64::from(ms))) => {
                    let _ = self.call_parked(Vm::on_tick);
                }
                () = self.tick_changed.notified() => {}
            }
        }
    }

    /// Waits until the filter resumes the stream `context` (`proxy_continue_stream`, a local reply or a close from a
    /// callback, or its VM trapping), or `timeout`.
    pub async fn wait_resumed(&self, context: u32, timeout: Duration) -> bool {
        if self.resumed_early.borrow_mut().remove(&context) {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.borrow_mut().insert(context, tx);
        let resumed = matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())));
        self.waiters.borrow_mut().remove(&context);
        resumed
    }
}
