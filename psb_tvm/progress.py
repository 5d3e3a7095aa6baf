"""What a compile is doing: stage timings (logged, and kept on the module as ``compile_seconds``),
a progress bar on a terminal, and a heartbeat that says which stage and TVM pass is running when a
compile takes long, so a slow compile never looks like a hang."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from contextlib import contextmanager

import tvm
from tqdm.auto import tqdm

from .pipeline import derived_pass_context

LOG = logging.getLogger("psb_tvm")

#: Seconds between "still running" messages (``$PSB_TVM_HEARTBEAT_S``; 0 disables them).
HEARTBEAT_S = 60.0

STAGES = ("import", "calibration", "encode", "rewrite", "build", "codegen", "weights")


@tvm.instrument.pass_instrument
class _CurrentPass:
    """Records the name of the TVM pass running now (for the heartbeat)."""

    def __init__(self, progress):
        self.progress = progress

    def run_before_pass(self, _mod, info):
        self.progress.current_pass = f"TVM pass {info.name}"


class CompileProgress:
    """One compile's stages. ``bar``: show a tqdm bar (``None``: only on a terminal)."""

    def __init__(self, bar: bool | None = None, heartbeat_s: float | None = None):
        self.seconds: dict = {}
        self.current_stage, self.current_pass = None, None
        self.kernels = None  # kernel_cache.build_objects' stats, when the kernels were built as objects
        self._start = time.perf_counter()
        self._stage_start = self._start
        self._bar = tqdm(total=len(STAGES), desc="psb_tvm.compile", unit="stage", leave=False,
                         disable=None if bar is None else not bar)
        if heartbeat_s is None:
            heartbeat_s = float(os.environ.get("PSB_TVM_HEARTBEAT_S", HEARTBEAT_S))
        self._stop = threading.Event()
        self._thread = None
        if heartbeat_s > 0:
            self._thread = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
            self._thread.start()

    @contextmanager
    def stage(self, name: str):
        self.current_stage, self.current_pass = name, None
        self._stage_start = time.perf_counter()
        self._bar.set_postfix_str(name)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - self._stage_start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
            LOG.info("compile: %s %.2f s", name, elapsed)
            self.current_stage = None
            self._bar.update(1)

    @contextmanager
    def passes(self):
        """A PassContext like the current one that also tells the heartbeat the running pass."""
        outer = tvm.transform.PassContext.current().instruments
        with derived_pass_context(instruments=list(outer) + [_CurrentPass(self)]):
            yield

    def kernel(self, done: int, total: int, name: str):
        """Kernel ``done`` of ``total`` (``name``) has been generated (``kernel_cache``)."""
        self.current_pass = f"kernels ({done} of {total} generated, last {name})"
        self._bar.set_postfix_str(f"{self.current_stage}: kernel {done}/{total}")

    def _heartbeat(self, every: float):
        while not self._stop.wait(every):
            stage = self.current_stage
            if stage is None:
                continue
            total = time.perf_counter() - self._start
            in_stage = time.perf_counter() - self._stage_start
            running = f", {self.current_pass}" if self.current_pass else ""
            LOG.warning("psb_tvm.compile still running after %.0f s: stage %r for %.0f s%s", total, stage, in_stage,
                        running)

    def close(self) -> dict:
        self._stop.set()
        self._bar.close()
        self.seconds["total"] = round(time.perf_counter() - self._start, 3)
        return self.seconds


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("psb_tvm_compile_progress", default=None)


@contextmanager
def tracking(progress: CompileProgress):
    """Make ``progress`` the one :func:`stage` reports to (for this thread / context)."""
    token = _CURRENT.set(progress)
    try:
        yield progress
    finally:
        _CURRENT.reset(token)


@contextmanager
def stage(name: str):
    """A stage of the compile being tracked, if any (``plan`` and ``tune`` run untracked)."""
    progress = _CURRENT.get()
    if progress is None:
        yield
        return
    with progress.stage(name):
        yield
