// The AssemblyScript member of the conformance corpus: a gate written with the public AssemblyScript proxy-wasm
// SDK (@solo-io/proxy-runtime, ABI 0.2.0, its own allocator), as a team outside Rust would write one. It logs each
// request's path, answers 401 itself to `x-as-gate: deny`, and adds `x-as` (its configuration) to every response.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context, log, LogLevelValues,
  send_local_response, GrpcStatusValues, HeaderPair, Headers
} from "@solo-io/proxy-runtime";

class GateRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Gate(context_id, this);
  }
}

class Gate extends Context {
  constructor(context_id: u32, root_context: GateRoot) {
    super(context_id, root_context);
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    log(LogLevelValues.info, "corpus: as-gate saw " + path);
    if (stream_context.headers.request.get("x-as-gate") == "deny") {
      const headers: Headers = [];
      headers.push(new HeaderPair(String.UTF8.encode("x-as"), String.UTF8.encode("denied")));
      send_local_response(401, "as_gate", String.UTF8.encode("denied by the AssemblyScript gate\n"), headers,
        GrpcStatusValues.InvalidCode);
      return FilterHeadersStatusValues.StopIteration;
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const config = this.root_context.getConfiguration();
    stream_context.headers.response.add("x-as", config == "" ? "gate" : config);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new GateRoot(context_id); }, "as_gate");
