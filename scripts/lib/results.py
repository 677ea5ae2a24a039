#!/usr/bin/env python3
"""Benchmark results files: bench/results/<script>-<UTC timestamp>.json (standard library only).

Used by scripts/bench, scripts/bench-ab, scripts/bench-health, scripts/bench-scaling and scripts/load-test to save
their raw figures with the machine and the commit they come from; scripts/render-results reads them back.

  results.py save SCRIPT RESULTS.json [name=value...]   # writes the results file, prints its path
  results.py wrk WORK ROUNDS CLK_TCK CASE...            # WORK/<case>.<round>.wrk and .cpu -> JSON rounds per case
  results.py kv <lines                                 # `name=value` lines -> a JSON object

The file: {"script", "date" (UTC ISO 8601), "git": {"commit", "dirty", "dirty_paths"}, "machine": {"cores",
"cpu_model", "kernel", "memory_gb"}, "parameters": {...}, "results": {...}}. The results directory is
$BENCH_RESULTS_DIR, or bench/results/ in the repository.
"""

import datetime
import json
import os
import platform
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAMP = "%Y%m%dT%H%M%SZ"
NAME = re.compile(r"^(?P<script>.+)-(?P<stamp>\d{8}T\d{6}Z)\.json$")


def results_dir():
    return os.environ.get("BENCH_RESULTS_DIR") or os.path.join(REPO, "bench", "results")


def value(text):
    """A figure as printed: an int, a float, a bool, null for `none`, or the text itself."""
    text = text.strip()
    if text.lower() in ("none", "null", ""):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def kv(lines):
    out = {}
    for line in lines:
        line = line.strip()
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
            name, _, v = line.partition("=")
            out[name] = value(v)
    return out


def git(*args):
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def metadata():
    commit = git("rev-parse", "HEAD")
    # results files do not make the tree dirty
    status = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    dirty = [line[3:] for line in (status or "").splitlines() if line.strip()]
    cpu_model = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "git": {"commit": commit.strip() if commit else None, "dirty": bool(dirty), "dirty_paths": dirty[:50]},
        "machine": {
            "cores": os.cpu_count(),
            "cpu_model": cpu_model,
            "kernel": platform.release(),
            "memory_gb": memory_gb,
        },
    }


def save(script, results, parameters):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    doc = {"script": script, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    doc.update(metadata())
    doc["parameters"] = parameters
    doc["results"] = results
    directory = results_dir()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{script}-{now.strftime(STAMP)}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def ms(v, unit):
    return round(float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 4)


def parse_wrk(text):
    """One wrk --latency run's figures."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    out = {
        "requests": int(m.group(1)),
        "duration_s": float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)],
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
    }
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", text)
        out[f"p{q}_ms"] = ms(*m.groups()) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def core_ticks(path):
    """Each core's stolen and interrupt ticks over a round (`<steal0> <irq0> <steal1> <irq1>` before, then after)."""
    try:
        v = [int(x) for x in open(path).read().split()]
    except (OSError, ValueError):
        return {}
    if len(v) != 8:
        return {}
    return {"steal_ticks": [v[4] - v[0], v[6] - v[2]], "irq_ticks": [v[5] - v[1], v[7] - v[3]]}


def wrk_rounds(work, rounds, clk_tck, cases):
    """Every round of every case: wrk's figures, the proxy's CPU ticks over the round (`none`: no proxy), and each
    core's stolen and interrupt ticks over it."""
    out = {}
    for c in cases:
        out[c] = []
        for r in range(1, rounds + 1):
            row = {"round": r}
            row.update(parse_wrk(open(f"{work}/{c}.{r}.wrk").read()))
            ticks = value(open(f"{work}/{c}.{r}.cpu").read())
            row["cpu_ticks"] = ticks
            row["cpu_us_per_request"] = (
                round(ticks * 1e6 / clk_tck / row["requests"], 3) if ticks is not None and row["requests"] else None
            )
            row.update(core_ticks(f"{work}/{c}.{r}.cores"))
            try:
                before, after = (float(x) for x in open(f"{work}/{c}.{r}.speed").read().split())
                row["core_speed_ms"] = [before, after]
            except (OSError, ValueError):
                pass
            out[c].append(row)
    return out


def main(argv):
    if len(argv) >= 3 and argv[1] == "save":
        results = json.load(open(argv[3])) if len(argv) > 3 else {}
        params = {}
        for a in argv[4:]:
            name, _, v = a.partition("=")
            params[name] = value(v)
        print(save(argv[2], results, params))
    elif len(argv) >= 5 and argv[1] == "wrk":
        json.dump(wrk_rounds(argv[2], int(argv[3]), int(argv[4]), argv[5:]), sys.stdout, indent=1)
        print()
    elif len(argv) == 2 and argv[1] == "kv":
        json.dump(kv(sys.stdin), sys.stdout, indent=1)
        print()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
