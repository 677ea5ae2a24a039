# shellcheck shell=bash
# The benchmark layout shared by scripts/bench and scripts/bench-ab (sourced, after setting repo, DURATION, ROUNDS and
# CONNS). On a 2-core machine: every proxy (Envoy --concurrency 1, nginx with 1 worker, equilibrio-host with 1 worker)
# is pinned to core 0; the nginx backends, the table stand-in and wrk share core 1. Same wrk settings for every case
# (-t1 -c$CONNS, keep-alive). A case's proxy CPU is the utime+stime delta of its process (and children) in
# /proc/<pid>/stat over the round.
#
#   bench_init NAME [host]        # setup, release builds (the bundled proxy only with `host`), an empty target/NAME
#   bench_start_backends          # 3 nginx backends on core 1
#   bench_start_table_stub        # the endpoint table (and EDS) for the filter's proxies, on core 1
#   bench_start_proxy PROXY       # nginx_rr native minimal filter sticky host host_routes floor_proxy (see case_proxy)
#   bench_rounds CASE...          # a warm-up of each, then ROUNDS interleaved rounds: target/NAME/<case>.<round>.wrk|cpu
#   bench_rounds_json CASE...     # those rounds as JSON (scripts/lib/results.py wrk)
#   bench_save NAME RESULTS.json [name=value...]   # bench/results/NAME-<UTC timestamp>.json (or $BENCH_RESULTS_DIR)

: "${repo:?set repo before sourcing scripts/lib/bench.sh}"
: "${DURATION:?}" "${ROUNDS:?}" "${CONNS:?}"
WARMUP=${BENCH_WARMUP:-2}
ENVOY="$repo/.venv/bin/envoy"
WASM="$repo/target/wasm32-wasip1/release/equilibrio_filter.wasm"
MINIMAL="$repo/target/wasm32-wasip1/release/equilibrio_bench_minimal_filter.wasm"
HOST="$repo/target/release/equilibrio-host"
RESULTS="$repo/scripts/lib/results.py"
CLK_TCK=$(getconf CLK_TCK)
SUP='"supervisor":{"cluster":"supervisor","authority":"127.0.0.1:18120","poll_period":1}'
STICKY_RL="{\"service\":\"agente-vendedor\",$SUP,\"sticky_sessions\":{\"enabled\":true,\"secret\":\"bench-secret-0123456789\",\"secure\":false},\"rate_limiting\":{\"enabled\":true,\"requests_per_minute\":100000000,\"burst_size\":10000000}}"
bench_name=bench
work=
cookie=
pids=()
declare -A proxy_pid=()
# the proxy each case measures (direct has none)
declare -A case_proxy=(
  [nginx_rr]=nginx_rr [native]=native [minimal]=minimal [filter]=filter [sticky_new]=sticky [sticky_cookie]=sticky
  [host_filter]=host [host_base]=host_base [host_routes]=host_routes [floor_proxy]=floor_proxy
)
declare -A url=(
  [direct]=http://127.0.0.1:18081/
  [nginx_rr]=http://127.0.0.1:18170/
  [host_filter]=http://127.0.0.1:18160/
  [host_base]=http://127.0.0.1:18162/
  [host_routes]=http://127.0.0.1:18164/
  [floor_proxy]=http://127.0.0.1:18190/
  [native]=http://127.0.0.1:18100/
  [minimal]=http://127.0.0.1:18140/
  [filter]=http://127.0.0.1:18110/
  [sticky_new]=http://127.0.0.1:18130/
  [sticky_cookie]=http://127.0.0.1:18130/
)
declare -A label=(
  [direct]="direct to one nginx backend"
  [nginx_rr]="nginx round robin (1 worker, upstream keep-alive)"
  [host_filter]="equilibrio-host + filter, weighted round robin"
  [host_base]="equilibrio-host + filter, weighted round robin: the BENCH_HOST_BASE build"
  [host_routes]="equilibrio-host + filter, weighted round robin, 3 routes checked (none matches)"
  [floor_proxy]="floor proxy (reference: tokio + httparse, round robin, no filter)"
  [native]="Envoy native round robin (STATIC)"
  [minimal]="Envoy + floor wasm filter (reference: one callback per request, round robin into the header)"
  [filter]="Envoy + filter, weighted round robin"
  [sticky_new]="Envoy + filter, sticky + rate limit (new session each request)"
  [sticky_cookie]="Envoy + filter, sticky + rate limit (client sends its cookie)"
)

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

bench_init() { # name [host]
  bench_name=$1
  work="$repo/target/$1"
  bash "$repo/scripts/setup" >/dev/null
  cargo build --quiet --release --target wasm32-wasip1 -p equilibrio-filter -p equilibrio-bench-minimal-filter
  cargo build --quiet --release -p equilibrio-tests --bin table-stub
  if [ "${2:-}" = host ]; then cargo build --quiet --release -p equilibrio-host; fi
  rm -rf "$work"
  mkdir -p "$work"
  trap bench_cleanup EXIT
}

wait_http() { # url
  for _ in $(seq 1 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$bench_name: $1 never answered" >&2
  exit 1
}

# ---------------------------------------------------------------- backends: 3 nginx servers, 1 worker, core 1
bench_start_backends() {
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:18081; location / { return 200 "av-1"; } }
  server { listen 127.0.0.1:18082; location / { return 200 "av-2"; } }
  server { listen 127.0.0.1:18083; location / { return 200 "av-3"; } }
}
NGINX
  taskset -c 1 /usr/sbin/nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
  pids+=($!)
  wait_http http://127.0.0.1:18081/
}

# ---------------------------------------------------------------- the table (and EDS) for the filter's proxies
bench_start_table_stub() {
  taskset -c 1 "$repo/target/release/table-stub" --listen 127.0.0.1:18120 --service agente-vendedor \
    av-1=127.0.0.1:18081 av-2=127.0.0.1:18082 av-3=127.0.0.1:18083 2>"$work/table-stub.log" &
  pids+=($!)
  sleep 0.3
}

# ---------------------------------------------------------------- proxy configs
bench_envoy_native_config() { # out
  cat >"$1" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 18101}}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: 18100}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          use_remote_address: true
          generate_request_id: false
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: backend}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              dynamic_stats: false
  clusters:
  - name: backend
    type: STATIC
    lb_policy: ROUND_ROBIN
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18081}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18082}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18083}}}
YAML
}

# The shipped proxy-config/envoy.yaml with bench ports, the built filter and a filter configuration.
render() { # listener admin filter-json out [http-filter-wasm http-filter-config]
  python3 - "$repo/proxy-config/envoy.yaml" "$1" "$2" "$3" "$WASM" "$4" "${5:-$WASM}" "${6:-$3}" <<'PY'
import os, sys
src, listener, admin, cfg, wasm, out, http_wasm, http_cfg = sys.argv[1:]
lines, values, files = [], 0, 0
for line in open(src):
    body = line.lstrip()
    indent = line[: len(line) - len(body)]
    if body.startswith("value: '{"):
        # the first is the poller's configuration, the second the HTTP filter's
        values += 1
        line = indent + "value: '" + (cfg if values == 1 else http_cfg).replace("'", "''") + "'\n"
    elif body.startswith("filename: ") and body.strip().endswith("equilibrio_filter.wasm"):
        files += 1
        line = indent + "filename: " + (wasm if files == 1 else http_wasm) + "\n"
    else:
        line = (line.replace("port_value: 9901", "port_value: " + admin)
                    .replace("port_value: 10000", "port_value: " + listener)
                    .replace("port_value: 9900", "port_value: " + os.environ.get("STUB_PORT", "18120")))
    lines.append(line)
open(out, "w").write("".join(lines))
PY
}

# The shipped proxy-config/host.yaml with bench ports, one worker, the built filter and a filter configuration.
render_host() { # listener admin filter-json out
  python3 - "$repo/proxy-config/host.yaml" "$1" "$2" "$3" "$WASM" "$4" <<'PY'
import os, sys
src, listener, admin, cfg, wasm, out = sys.argv[1:]
lines = []
for line in open(src):
    body = line.lstrip()
    indent = line[: len(line) - len(body)]
    if body.startswith("configuration: '{"):
        line = indent + "configuration: '" + cfg.replace("'", "''") + "'\n"
    elif body.startswith("file: ") and body.strip().endswith("equilibrio_filter.wasm"):
        line = indent + "file: " + wasm + "\n"
    else:
        line = (line.replace("127.0.0.1:10000", "127.0.0.1:" + listener)
                    .replace("127.0.0.1:9901", "127.0.0.1:" + admin)
                    .replace("[127.0.0.1:9900]", "[127.0.0.1:" + os.environ.get("STUB_PORT", "18120") + "]"))
    lines.append(line)
open(out, "w").write("".join(lines))
PY
}

start_envoy() { # name config admin-port
  taskset -c 0 "$ENVOY" -c "$2" --concurrency 1 --disable-hot-restart -l warn >"$work/$1.log" 2>&1 &
  pids+=($!)
  proxy_pid[$1]=$!
  wait_http "http://127.0.0.1:$3/ready"
}

# ---------------------------------------------------------------- the proxies, one worker each, core 0
bench_start_proxy() { # nginx_rr | native | minimal | filter | sticky | host
  case $1 in
    nginx_rr) # the baseline of a lean proxy
      mkdir -p "$work/nginx-rr"
      cat >"$work/nginx-rr/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx-rr/nginx.pid;
error_log $work/nginx-rr/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend {
    server 127.0.0.1:18081;
    server 127.0.0.1:18082;
    server 127.0.0.1:18083;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:18170;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
      taskset -c 0 /usr/sbin/nginx -c "$work/nginx-rr/nginx.conf" -p "$work/nginx-rr" &
      pids+=($!)
      proxy_pid[nginx_rr]=$!
      wait_http http://127.0.0.1:18170/
      ;;
    native)
      bench_envoy_native_config "$work/envoy-native.yaml"
      start_envoy native "$work/envoy-native.yaml" 18101
      ;;
    minimal)
      render 18140 18141 "{\"service\":\"agente-vendedor\",$SUP}" "$work/envoy-minimal.yaml" "$MINIMAL" \
        "127.0.0.1:18081,127.0.0.1:18082,127.0.0.1:18083"
      start_envoy minimal "$work/envoy-minimal.yaml" 18141
      ;;
    filter)
      render 18110 18111 "{\"service\":\"agente-vendedor\",$SUP}" "$work/envoy-filter.yaml"
      start_envoy filter "$work/envoy-filter.yaml" 18111
      ;;
    sticky)
      render 18130 18131 "$STICKY_RL" "$work/envoy-sticky-rl.yaml"
      start_envoy sticky "$work/envoy-sticky-rl.yaml" 18131
      ;;
    host)
      render_host 18160 18161 "{\"service\":\"agente-vendedor\",$SUP}" "$work/host-filter.yaml"
      taskset -c 0 "$HOST" -c "$work/host-filter.yaml" --concurrency 1 -l warn >"$work/host.log" 2>&1 &
      pids+=($!)
      proxy_pid[host]=$!
      wait_http http://127.0.0.1:18161/ready
      ;;
    host_routes)
      # the agente-vendedor example's three routes: a GET / is checked against all three (path, method) and matches none
      local routes
      routes=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["routes"]))' \
        "$repo/proxy-config/agente-vendedor-routes.json")
      render_host 18164 18165 "{\"service\":\"agente-vendedor\",$SUP,\"routes\":$routes}" "$work/host-routes.yaml"
      taskset -c 0 "$HOST" -c "$work/host-routes.yaml" --concurrency 1 -l warn >"$work/host-routes.log" 2>&1 &
      pids+=($!)
      proxy_pid[host_routes]=$!
      wait_http http://127.0.0.1:18165/ready
      ;;
    host_base)
      # another build of the bundled proxy (BENCH_HOST_BASE), measured in the same interleaved rounds: an A/B of a change
      render_host 18162 18163 "{\"service\":\"agente-vendedor\",$SUP}" "$work/host-base.yaml"
      taskset -c 0 "$BENCH_HOST_BASE" -c "$work/host-base.yaml" --concurrency 1 -l warn >"$work/host-base.log" 2>&1 &
      pids+=($!)
      proxy_pid[host_base]=$!
      wait_http http://127.0.0.1:18163/ready
      ;;
    floor_proxy)
      # the floor of an HTTP/1 proxy on tokio and httparse (bench/floor-proxy): what the bundled proxy's machinery
      # costs above it
      cargo build --quiet --release -p equilibrio-bench-floor-proxy
      taskset -c 0 "$repo/target/release/floor-proxy" 127.0.0.1:18190 127.0.0.1:18081 127.0.0.1:18082 127.0.0.1:18083 \
        >"$work/floor-proxy.log" 2>&1 &
      pids+=($!)
      proxy_pid[floor_proxy]=$!
      wait_http http://127.0.0.1:18190/
      ;;
    *)
      echo "$bench_name: unknown proxy $1" >&2
      exit 1
      ;;
  esac
}

# wait until a proxy's filter has its table (and, for Envoy, its EDS cluster the 3 hosts)
bench_wait_table() { # admin-port [envoy]
  local v
  for _ in $(seq 1 100); do
    v=$(curl -fsS "http://127.0.0.1:$1/stats?filter=equilibrio_table_version" 2>/dev/null | awk '{print $2}')
    if [ "${v:-0}" -ge 1 ]; then
      [ "${2:-}" != envoy ] && break
      [ "$(curl -fsS "http://127.0.0.1:$1/clusters" | grep -c '^backend::.*::cx_active::')" -eq 3 ] && break
    fi
    sleep 0.1
  done
}
bench_wait_envoy_table() { bench_wait_table "$1" envoy; }
bench_wait_host_table() { bench_wait_table "$1"; }

# a valid session cookie from the sticky Envoy, for the case where clients come back with it
bench_sticky_cookie() {
  cookie=$(curl -fsS -D - -o /dev/null http://127.0.0.1:18130/ | awk -F': ' 'tolower($1)=="set-cookie"{print $2}' | cut -d';' -f1 | tr -d '\r')
  if [ -z "$cookie" ]; then
    echo "$bench_name: the sticky Envoy set no cookie" >&2
    exit 1
  fi
}

cpu_ticks() { # a process and its children (nginx's master and worker); `none` without a process
  [ -n "${1:-}" ] || { echo none; return; }
  local p t=0
  for p in "$1" $(pgrep -P "$1" || true); do
    t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}

case_pid() { # case: its proxy's pid, empty for none
  local p=${case_proxy[$1]:-}
  [ -z "$p" ] || echo "${proxy_pid[$p]:-}"
}

# per core (0 and 1): ticks stolen by the hypervisor, and ticks spent in interrupts (irq + softirq), from /proc/stat
core_ticks() { awk '/^cpu[01] /{printf "%s %s ", $9, $7 + $8}' /proc/stat; }

# How fast core 0 runs a fixed piece of work right now, in ms (lower is faster): this VM has no hardware counters,
# and a busy neighbour on the same physical core (an SMT sibling, invisible in steal time) slows every instruction.
core_speed() {
  taskset -c 0 python3 -c 'import statistics, time
def run():
    t = time.perf_counter(); x = 0
    for i in range(100000): x += i * i
    return (time.perf_counter() - t) * 1000
print(round(statistics.median(run() for _ in range(7)), 3))'
}

run_wrk() { # case round; also records the proxy's CPU ticks (1/CLK_TCK s) used during the run, and each core's
  # stolen and interrupt ticks over it (what makes a round drift: see docs/performance-tuning.md#noise)
  local extra=() pid t0 t1 k0 k1 s0 s1
  pid=$(case_pid "$1")
  s0=$(core_speed)
  [ "$1" = sticky_cookie ] && extra=(-H "Cookie: $cookie")
  [ -n "${WRK_SCRIPT:-}" ] && extra+=(-s "$WRK_SCRIPT")
  t0=$(cpu_ticks "$pid")
  k0=$(core_ticks)
  taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${extra[@]}" "${url[$1]}" >"$work/$1.$2.wrk"
  k1=$(core_ticks)
  t1=$(cpu_ticks "$pid")
  if [ "$t0" = none ]; then echo none; else echo $((t1 - t0)); fi >"$work/$1.$2.cpu"
  echo "$k0 $k1" >"$work/$1.$2.cores"
  s1=$(core_speed)
  echo "$s0 $s1" >"$work/$1.$2.speed"
}

bench_rounds() { # case...: a warm-up of each, then ROUNDS interleaved rounds (A, B, C, A, B, C, ...)
  local c r
  echo "$bench_name: warming up" >&2
  for c in "$@"; do DURATION=$WARMUP run_wrk "$c" warm; done
  for r in $(seq 1 "$ROUNDS"); do
    for c in "$@"; do
      echo "$bench_name: round $r/$ROUNDS: ${label[$c]}" >&2
      run_wrk "$c" "$r"
    done
  done
}

bench_rounds_json() { # case...
  python3 "$RESULTS" wrk "$work" "$ROUNDS" "$CLK_TCK" "$@"
}

rss() { ps -o rss= -p "$1" 2>/dev/null | awk '{printf "%.0f", $1/1024}'; }

bench_save() { # name results.json [name=value...]: prints the results file's path
  python3 "$RESULTS" save "$@"
}
