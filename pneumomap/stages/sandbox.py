"""Run a crash-prone native decoder in a child process, so that a crash fails one image, not the run.

gdcm aborts the whole process (a C++ assertion, SIGABRT) on some corrupt JPEG-family DICOMs, which
no ``except`` can catch. `call` sends the work to one long-lived child process (started on first use
with the 'spawn' method, so nothing of the parent's threads is inherited) and returns its result; if
the child dies or exceeds ``timeout`` seconds, `DecoderCrashed` is raised and a fresh child is started
for the next call. Only images that reach the last-resort decoder pay the round trip.
"""
from __future__ import annotations

import multiprocessing
import threading
from typing import Any, Callable


class DecoderCrashed(RuntimeError):
    """The child process died (or hung) while decoding; the message says how."""


def _serve(conn: Any) -> None:
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            try:
                conn.send((False, exc))
            except Exception:  # an exception that does not pickle
                conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


class Sandbox:
    """One child process that runs module-level functions (picklable by reference)."""

    def __init__(self, timeout: float = 300.0):
        self.timeout = timeout
        self._process: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()  # one call at a time (images decoded in several threads)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True, name="pneumomap-decoder")
        self._process.start()
        child.close()

    def _stop(self) -> str:
        process, self._process = self._process, None
        if process is None:
            return "not started"
        if process.is_alive():
            process.kill()
        process.join(5)
        code = process.exitcode
        return f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            try:
                self._conn.send((fn, args))
                if not self._conn.poll(self.timeout):
                    raise DecoderCrashed(f"the decoder took more than {self.timeout:.0f} s and was stopped ({self._stop()})")
                ok, value = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise DecoderCrashed(f"the decoder crashed ({self._stop()})") from None
        if ok:
            return value
        raise value

    def close(self) -> None:
        with self._lock:
            self._stop()


_SANDBOX: Sandbox | None = None


def sandbox() -> Sandbox:
    """This process's sandbox (one per process: decode workers each have their own)."""
    global _SANDBOX
    if _SANDBOX is None:
        _SANDBOX = Sandbox()
    return _SANDBOX
