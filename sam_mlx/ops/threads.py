"""MLX's per-thread state, made in each thread that computes and released when that thread ends.

Since MLX 0.31.2 a stream works only in the thread that made it ("There is no Stream(cpu, 1) in current
thread" elsewhere), and compiled functions keep their cache per thread. MLX releases the main thread's
state at exit, but a worker thread's only if that thread calls ``mx.clear_streams()`` before it ends;
otherwise the process aborts at exit ("terminate called without an active exception") once a compiled
function has run in a worker. The threads are the caller's (a server's pool, an app's worker), so
``this_thread()`` leaves in each thread that computes a ``ThreadState`` kept in a ``threading.local``:
CPython deletes it in that same thread as the thread ends, and it then releases the thread's MLX state.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx

_local = threading.local()


class ThreadState:
    """One thread's extra MLX streams (``bands``); releases the thread's MLX state when deleted in it."""

    def __init__(self) -> None:
        self.thread_id = threading.get_ident()
        self.streams: list[mx.Stream] = []

    def __del__(self) -> None:
        # At interpreter exit the states of threads still alive (daemons) and the main thread's are deleted
        # from the main thread: MLX's own exit handler releases the main thread, the others' are left alone.
        if threading.get_ident() == self.thread_id != threading.main_thread().ident:
            mx.clear_streams()


def this_thread() -> ThreadState:
    """The calling thread's state, made on its first call."""
    state = getattr(_local, "state", None)
    if state is None:
        state = _local.state = ThreadState()
    return state


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``mx.compile(fn)`` whose per-thread cache is released with each thread that calls it."""
    compiled_fn = mx.compile(fn)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        this_thread()
        return compiled_fn(*args)

    return call
