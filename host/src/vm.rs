//! A plugin's compiled module and its running VMs. [`Plugin`] compiles the `.wasm` once for the process and checks
//! it is a proxy-wasm module; [`Vm`] is one instance with its root context, started as Envoy starts one
//! (`_initialize`, root context, `proxy_on_vm_start`, `proxy_on_configure`), with one method per callback. A trap
//! is returned as [`Trap`]: the caller drops the VM and makes a new one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::{Engine, Instance, Linker, Module, Store, TypedFunc};

use crate::config::PluginConfig;
use crate::context::{BodyBuffer, CallResponse, Effects, Env, HostState, Parked, PluginInfo, Stream};

/// A trap (or other failure) inside the guest, with wasmtime's message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Trap(pub String);

fn trap(e: wasmtime::Error) -> Trap {
    Trap(format!("{e:#}"))
}

/// A filter action (Continue or Pause), and a body callback's.
pub use crate::abi::types::{Action, DataAction};

/// The ABI versions we speak: 0.2.1, and 0.2.0 (the same calls as far as filters use them).
const ABI_MARKERS: [&str; 2] = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];

pub struct Plugin {
    pub info: Arc<PluginInfo>,
    module: Module,
    linker: Linker<HostState>,
}

impl Plugin {
    /// Compiles and links `config.file`; the error names the file and what is wrong with it.
    /// Modules already compiled (by path) are reused from `compiled`: plugins sharing a `.wasm` compile it once.
    pub fn load(
        engine: &Engine,
        config: &PluginConfig,
        compiled: &mut HashMap<PathBuf, Module>,
    ) -> Result<Plugin, String> {
        let file = config.file.display();
        let module = match compiled.get(&config.file) {
            Some(m) => m.clone(),
            None => {
                let bytes = std::fs::read(&config.file).map_err(|e| format!("cannot read {file}: {e}"))?;
                let m = Module::new(engine, &bytes).map_err(|e| format!("{file} is not a valid wasm module: {e:#}"))?;
                compiled.insert(config.file.clone(), m.clone());
                m
            }
        };
        if !module.exports().any(|e| ABI_MARKERS.contains(&e.name())) {
            return Err(format!("{file} is not a proxy-wasm 0.2 filter (it exports no proxy_abi_version_0_2_1)"));
        }
        if !module.exports().any(|e| e.name() == "proxy_on_memory_allocate" || e.name() == "malloc") {
            return Err(format!("{file} exports no allocator (proxy_on_memory_allocate or malloc)"));
        }
        let mut linker = Linker::new(engine);
        crate::abi::wasi::add_to_linker(&mut linker, &module).map_err(|e| format!("linking WASI for {file}: {e:#}"))?;
        crate::abi::imports::add_to_linker(&mut linker).map_err(|e| format!("linking {file}: {e:#}"))?;
        crate::abi::imports::define_missing(&mut linker, &module);
        let info = Arc::new(PluginInfo {
            name: config.name.clone(),
            root_id: config.root_id.clone(),
            vm_id: config.vm_id.clone(),
            configuration: config.configuration_bytes(),
            vm_configuration: config.vm_configuration_bytes(),
        });
        Ok(Plugin { info, module, linker })
    }
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponseArgs = (i32, i32, i32, i32, i32);

struct Exports {
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    on_configure: Option<TypedFunc<(i32, i32), i32>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_http_call_response: Option<TypedFunc<CallResponseArgs, ()>>,
}

pub struct Vm {
    store: Store<HostState>,
    f: Exports,
    pub root_context: u32,
    next_context: u32,
}

/// Why a VM did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the filter trapped while starting: {0}")]
    Trap(#[from] Trap),
    #[error("the filter refused its {0} (its log says why)")]
    Refused(&'static str),
}

fn typed<P, R>(instance: &Instance, store: &mut Store<HostState>, name: &str) -> Result<Option<TypedFunc<P, R>>, Trap>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f.typed(&*store).map(Some).map_err(|e| Trap(format!("export {name} has the wrong type: {e:#}"))),
    }
}

impl Vm {
    pub fn start(engine: &Engine, plugin: &Plugin, env: Arc<Env>) -> Result<Vm, StartError> {
        let deadline = env.limits.deadline_ticks;
        let mut store = Store::new(engine, HostState::new(plugin.info.clone(), env));
        store.limiter(|s| &mut s.store_limits);
        if let Some(ticks) = deadline {
            store.epoch_deadline_trap();
            store.set_epoch_deadline(ticks);
        }
        let instance = plugin.linker.instantiate(&mut store, &plugin.module).map_err(trap)?;
        store.data_mut().memory = instance.get_memory(&mut store, "memory");
        let malloc = match typed::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed::<i32, i32>(&instance, &mut store, "malloc")?,
        };
        store.data_mut().malloc = malloc;
        // every callback is optional, as in Envoy: a module that does not export one is not called for it
        let f = Exports {
            on_context_create: typed(&instance, &mut store, "proxy_on_context_create")?,
            on_vm_start: typed(&instance, &mut store, "proxy_on_vm_start")?,
            on_configure: typed(&instance, &mut store, "proxy_on_configure")?,
            on_tick: typed(&instance, &mut store, "proxy_on_tick")?,
            on_request_headers: typed(&instance, &mut store, "proxy_on_request_headers")?,
            on_response_headers: typed(&instance, &mut store, "proxy_on_response_headers")?,
            on_request_body: typed(&instance, &mut store, "proxy_on_request_body")?,
            on_response_body: typed(&instance, &mut store, "proxy_on_response_body")?,
            on_request_trailers: typed(&instance, &mut store, "proxy_on_request_trailers")?,
            on_response_trailers: typed(&instance, &mut store, "proxy_on_response_trailers")?,
            on_log: typed(&instance, &mut store, "proxy_on_log")?,
            on_done: typed(&instance, &mut store, "proxy_on_done")?,
            on_delete: typed(&instance, &mut store, "proxy_on_delete")?,
            on_http_call_response: typed(&instance, &mut store, "proxy_on_http_call_response")?,
        };
        // a reactor initializes itself in `_initialize`; a command in `_start`
        for init in ["_initialize", "_start"] {
            if let Some(func) = typed::<(), ()>(&instance, &mut store, init)? {
                func.call(&mut store, ()).map_err(trap)?;
                break;
            }
        }
        let mut vm = Vm { store, f, root_context: 1, next_context: 2 };
        vm.store.data_mut().effective_context = vm.root_context;
        if let Some(f) = &vm.f.on_context_create {
            f.call(&mut vm.store, (vm.root_context as i32, 0)).map_err(trap)?;
        }
        let vm_config = vm.store.data().plugin.vm_configuration.len() as i32;
        if let Some(f) = vm.f.on_vm_start.clone()
            && f.call(&mut vm.store, (vm.root_context as i32, vm_config)).map_err(trap)? == 0
        {
            return Err(StartError::Refused("VM configuration"));
        }
        let config = vm.store.data().plugin.configuration.len() as i32;
        if let Some(f) = vm.f.on_configure.clone()
            && f.call(&mut vm.store, (vm.root_context as i32, config)).map_err(trap)? == 0
        {
            return Err(StartError::Refused("configuration"));
        }
        Ok(vm)
    }

    /// Gives the next entry into the VM its whole time budget (the deadline counts from now).
    fn arm(&mut self) {
        if let Some(ticks) = self.store.data().env.limits.deadline_ticks {
            self.store.set_epoch_deadline(ticks);
        }
    }

    pub fn plugin(&self) -> &PluginInfo {
        &self.store.data().plugin
    }

    /// What host calls asked for since the last time.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.store.data_mut().effects)
    }

    pub fn has_effects(&self) -> bool {
        !self.store.data().effects.is_empty()
    }

    /// Runs `call` with the paused streams in the VM's reach (a callback may set one as its effective context), and
    /// gives them back, whatever the call's outcome.
    fn with_parked<R>(&mut self, parked: &mut Parked, call: impl FnOnce(&mut Self) -> R) -> R {
        std::mem::swap(&mut self.store.data_mut().parked, parked);
        let r = call(self);
        std::mem::swap(&mut self.store.data_mut().parked, parked);
        r
    }

    pub fn on_tick(&mut self, parked: &mut Parked) -> Result<(), Trap> {
        self.arm();
        let Some(f) = self.f.on_tick.clone() else { return Ok(()) };
        self.store.data_mut().effective_context = self.root_context;
        self.with_parked(parked, |vm| f.call(&mut vm.store, vm.root_context as i32).map_err(trap))
    }

    pub fn on_http_call_response(
        &mut self,
        context: u32,
        token: u32,
        response: CallResponse,
        parked: &mut Parked,
    ) -> Result<(), Trap> {
        self.arm();
        let Some(f) = self.f.on_http_call_response.clone() else { return Ok(()) };
        let args = (
            context as i32,
            token as i32,
            response.headers.len() as i32,
            response.body.len() as i32,
            response.trailers.len() as i32,
        );
        let state = self.store.data_mut();
        state.effective_context = context;
        state.call_response = Some(response);
        let r = self.with_parked(parked, |vm| f.call(&mut vm.store, args).map_err(trap));
        self.store.data_mut().call_response = None;
        r
    }

    /// Whether the module has a body callback for this direction (if not, bodies stream past it untouched).
    pub fn exports_body(&self, response: bool) -> bool {
        if response { self.f.on_response_body.is_some() } else { self.f.on_request_body.is_some() }
    }

    /// Whether the module has a trailers callback for this direction.
    pub fn exports_trailers(&self, response: bool) -> bool {
        if response { self.f.on_response_trailers.is_some() } else { self.f.on_request_trailers.is_some() }
    }

    /// Creates an HTTP context for a new stream.
    pub fn create_stream_context(&mut self) -> Result<u32, Trap> {
        self.arm();
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        self.store.data_mut().effective_context = id;
        if let Some(f) = &self.f.on_context_create {
            f.call(&mut self.store, (id as i32, self.root_context as i32)).map_err(trap)?;
        }
        Ok(id)
    }

    /// Runs `call` with the stream in the VM's reach, and gives it back (the caller's slot is empty meanwhile).
    fn with_stream<R>(
        &mut self,
        context: u32,
        stream: &mut Option<Box<Stream>>,
        call: impl FnOnce(&Exports, &mut Store<HostState>) -> R,
    ) -> R {
        self.arm();
        let state = self.store.data_mut();
        state.stream = stream.take();
        state.stream_context = context;
        state.effective_context = context;
        let r = call(&self.f, &mut self.store);
        *stream = self.store.data_mut().stream.take();
        r
    }

    pub fn on_request_headers(
        &mut self,
        context: u32,
        stream: &mut Option<Box<Stream>>,
        end_of_stream: bool,
    ) -> Result<Action, Trap> {
        let n = stream
            .as_ref()
            .map_or(0, |s| (s.request.headers.len() + 4 - crate::headers::hidden(&s.request.headers)) as i32);
        self.with_stream(context, stream, |f, store| match &f.on_request_headers {
            Some(func) => {
                func.call(store, (context as i32, n, i32::from(end_of_stream))).map(Action::from_code).map_err(trap)
            }
            None => Ok(Action::Continue),
        })
    }

    pub fn on_response_headers(
        &mut self,
        context: u32,
        stream: &mut Option<Box<Stream>>,
        end_of_stream: bool,
    ) -> Result<Action, Trap> {
        let n = stream.as_ref().and_then(|s| s.response.as_ref()).map_or(0, |r| r.headers.len() as i32 + 1);
        self.with_stream(context, stream, |f, store| match &f.on_response_headers {
            Some(func) => {
                func.call(store, (context as i32, n, i32::from(end_of_stream))).map(Action::from_code).map_err(trap)
            }
            None => Ok(Action::Continue),
        })
    }

    /// `proxy_on_request_body` / `proxy_on_response_body` with `bytes` (what this filter holds, the new data
    /// included) as the body buffer the filter reads and changes.
    pub fn on_body(
        &mut self,
        context: u32,
        stream: &mut Option<Box<Stream>>,
        response: bool,
        bytes: &mut Vec<u8>,
        end_of_stream: bool,
    ) -> Result<DataAction, Trap> {
        let func = if response { self.f.on_response_body.clone() } else { self.f.on_request_body.clone() };
        let Some(func) = func else { return Ok(DataAction::Continue) };
        let size = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.store.data_mut().body = Some(BodyBuffer { response, bytes: std::mem::take(bytes) });
        let r = self.with_stream(context, stream, |_, store| {
            func.call(store, (context as i32, size, i32::from(end_of_stream))).map(DataAction::from_code).map_err(trap)
        });
        if let Some(b) = self.store.data_mut().body.take() {
            *bytes = b.bytes;
        }
        r
    }

    /// `proxy_on_request_trailers` / `proxy_on_response_trailers` (the stream holds the trailers).
    pub fn on_trailers(
        &mut self,
        context: u32,
        stream: &mut Option<Box<Stream>>,
        response: bool,
    ) -> Result<Action, Trap> {
        let func = if response { self.f.on_response_trailers.clone() } else { self.f.on_request_trailers.clone() };
        let Some(func) = func else { return Ok(Action::Continue) };
        let n = stream.as_ref().map_or(0, |s| {
            let t = if response { &s.response_trailers } else { &s.request_trailers };
            t.as_ref().map_or(0, |t| t.len() as i32)
        });
        self.with_stream(context, stream, |_, store| {
            func.call(store, (context as i32, n)).map(Action::from_code).map_err(trap)
        })
    }

    /// The end of a stream: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`, in Envoy's order (the access log
    /// first; the conformance suite compares it).
    pub fn finish_stream(&mut self, context: u32, stream: &mut Option<Box<Stream>>) -> Result<(), Trap> {
        self.arm();
        self.with_stream(context, stream, |f, store| {
            let ctx = context as i32;
            if let Some(func) = &f.on_log {
                func.call(&mut *store, ctx).map_err(trap)?;
            }
            if let Some(func) = &f.on_done {
                func.call(&mut *store, ctx).map_err(trap)?;
            }
            if let Some(func) = &f.on_delete {
                func.call(&mut *store, ctx).map_err(trap)?;
            }
            Ok(())
        })
    }
}
