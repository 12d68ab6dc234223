"""Shared by the benchmark tools: each engine runs in a fresh subprocess of the same script."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_child(script: str, engine: str, args: list[str]) -> dict:
    """Run `script --child engine args...` and return the JSON object it prints last."""
    cmd = [sys.executable, script, "--child", engine, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{engine} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def warm_edgelora(model: str, env: dict[str, str] | None = None) -> None:
    """Compile and cache every kernel once (`edgelora warmup`), so that the measured process
    loads machine code from Numba's cache instead of compiling: a fresh install's first run
    pays seconds of JIT and ~100 MB of compiler memory, which is not what serving costs.
    env: the warm-up's environment (None: this process's)."""
    cmd = [sys.executable, "-m", "edgelora_np.cli", "warmup", "--model", model]
    # Run from tools/, like the measured processes: from the repository root, `-m` would
    # import the source tree's edgelora_np (and fill its kernel cache) instead of the installed one.
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parent, env=env)
    if done.returncode != 0:
        sys.exit(f"edgelora warmup failed:\n{done.stderr[-3000:]}")


def nothing_answers(url: str) -> str | None:
    """None if nothing answers at `url` yet, else why not: call before starting a server
    there, or wait_healthy would take a leftover server's answers for the new one's while the
    new one fails to bind."""
    import httpx

    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.TransportError:
        return None
    return f"something already answers at {url}"


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> str | None:
    """Poll `url`/health until it answers 200; None then, else why not (`proc` exited, or
    `timeout_s` passed)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return None
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return f"/health not 200 after {timeout_s:g} s"
