"""One thread runs every forward pass of the process, whichever thread asks for it.

Numba's parallel loops run on GNU OpenMP (its `omp` threading layer, the one its Linux wheels
use on x86-64 and aarch64 alike). libgomp keeps a pool of worker threads for each thread that
has started a parallel region, for as long as that thread lives. While all the pools together
hold no more threads than the machine has cores, a worker spins for a while after a region and
the next region starts at once. Once they hold more, every worker goes to sleep after each
region, and each region then waits for the kernel to wake its workers.

`load_model` runs a warm-up forward on the caller's thread, typically the main thread, which
lives as long as the process. The engine thread's pool was then one pool too many. Measured on
the 2-core VM: single-stream decode through `Model.generate` ran at 34 tok/s on 1.15 cores,
against 76 tok/s on 2 cores when the same engine was stepped on the main thread; an empty
two-thread region took 75-87 us against 13 us.

So `run(fn, *args)` runs fn on one long-lived thread and hands back its result, or raises its
exception in the caller. Calls from different threads take turns, as they would for the cores
anyway. Numba's thread count is a per-thread setting: each call carries the caller's.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba

THREAD_NAME = "edgelora-compute"


class _ComputeThread:
    def __init__(self):
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = -1
        self._here = threading.local()        # .inside: this thread is the compute thread

    def run(self, fn, *args, **kwargs):
        n_threads = numba.get_num_threads()
        if getattr(self._here, "inside", False):          # a forward inside a forward
            return self._call(n_threads, fn, args, kwargs)
        return self._pool().submit(self._call, n_threads, fn, args, kwargs).result()

    def _call(self, n_threads, fn, args, kwargs):
        self._here.inside = True
        numba.set_num_threads(n_threads)
        return fn(*args, **kwargs)

    def _pool(self) -> ThreadPoolExecutor:
        # A forked child inherits the executor but not its thread: it starts its own.
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
                self._pid = os.getpid()
            return self._executor


_COMPUTE = _ComputeThread()
run = _COMPUTE.run
