"""Run wrk (keep-alive HTTP load) and read its report."""

import re
import resource
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL_HINT = "wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def available():
    return shutil.which("wrk") is not None


def run(url, seconds, connections=64, threads=2, headers=(), script=None, env=None):
    """Load `url` for `seconds`; return requests/s, latency percentiles (ms), errors and wrk's own CPU."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    if script:
        argv += ["-s", str(HERE / script)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True, env=env).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    percentiles = {int(p): _ms(value, unit) for p, value, unit in
                   re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50_ms": percentiles[50],
        "p99_ms": percentiles[99],
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
        "loadgen_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


def _ms(value, unit):
    return float(value) * UNITS[unit]
