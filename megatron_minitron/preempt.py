"""Stopping a long stage cleanly before its job is killed.

Sources of a stop request:
  * a signal: SIGUSR1 / SIGUSR2 (Slurm `#SBATCH --signal=USR1@600` sends it some minutes
    before the time limit) or SIGTERM (Slurm at the limit, on preemption or `scancel`;
    torchrun's agent forwards it to its workers). The handler only sets a flag;
  * a wall-clock limit, `exit_duration_minutes` (clusters without signals), counted from
    the stage's start.

Every rank must stop after the SAME step (the checkpoint is a collective save), but a
signal reaches ranks at different moments. `StopRequest.poll()` therefore agrees: the
local flags are MAX-reduced over the world on a dedicated gloo group (CPU tensors, so NCCL
jobs pay no device sync). `lag=1` (the stats stage, whose steps have no collective of
their own) overlaps the reduction with the next step: poll k starts an async all-reduce
and returns the result of poll k-1, so ranks may drift by one step but never wait on each
other per step. The stage then saves, calls `finish()`, and returns normally (exit 0).

A launcher learns that the run stopped early (and should be requeued) from the file named
by $MINITRON_INTERRUPTED_FILE, which rank 0 writes (slurm/minitron.sbatch sets it).
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .config import ConfigError

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
MARKER_ENV = "MINITRON_INTERRUPTED_FILE"


def check_minutes(value: float, name: str = "exit_duration_minutes") -> None:
    if not value >= 0:  # also NaN
        raise ConfigError(f"{name}={value} must be >= 0 minutes (0 = no limit); e.g. 230 for "
                          "a 4-hour job that needs 10 minutes to save")


class StopRequest:
    """Signal handlers + wall-clock limit + cross-rank agreement. Use as a context manager
    around the stage's loop (handlers are restored on exit; a handler installed before,
    e.g. an enclosing stage's, is still called)."""

    def __init__(self, exit_duration_minutes: float = 0.0, start_time: Optional[float] = None,
                 lag: int = 0, signals=STOP_SIGNALS):
        check_minutes(exit_duration_minutes)
        if lag not in (0, 1):
            raise ValueError(f"lag={lag}: use 0 (agree now) or 1 (agree one poll later)")
        self.limit_s = exit_duration_minutes * 60.0
        self.t0 = time.time() if start_time is None else start_time
        self.lag = lag
        self.signals = [getattr(signal, s) for s in signals]
        self.received: Optional[str] = None  # name of the first stop signal seen
        self.received_at: Optional[float] = None
        self.reason: Optional[str] = None  # set once the ranks agreed to stop
        self._prev: dict = {}
        self._group = None
        self._pending = None  # (work, tensor) of the lagged reduction

    # ------------------------------------------------------------------ handlers

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_at = time.time()
        prev = self._prev.get(signum)
        if callable(prev):
            prev(signum, frame)

    def __enter__(self) -> "StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._prev[s] = signal.signal(s, self._handler)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")
        return self

    start = __enter__  # for loops that are not inside a `with` block

    def close(self) -> None:
        self.__exit__(None, None, None)

    def __exit__(self, *exc) -> None:
        self.finish()
        for s, prev in self._prev.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._prev.clear()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    # ------------------------------------------------------------------ agreement

    def _local(self) -> int:
        if self.received is not None:
            return 2
        if self.limit_s and time.time() - self.t0 >= self.limit_s:
            return 1
        return 0

    def poll(self) -> bool:
        """Collective (every rank, same number of calls): True when the ranks agree to stop."""
        if self._group is None:
            code = self._local()
        elif self.lag == 0:
            t = torch.tensor([self._local()], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            code = int(t.item())
        else:
            code = 0
            if self._pending is not None:
                work, t = self._pending
                work.wait()
                code = int(t.item())
            t = torch.tensor([self._local()], dtype=torch.int32)
            self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group,
                                             async_op=True), t)
        if code and self.reason is None:
            self.reason = (f"signal {self.received or '(on another rank)'}" if code == 2 else
                           f"exit_duration_minutes={self.limit_s / 60:g} reached")
        return bool(code)

    def finish(self) -> None:
        """Complete a pending lagged reduction (every rank calls it the same number of times)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    # ------------------------------------------------------------------ reporting

    def record(self, out_dir, step, what: str) -> dict:
        """After the stop's save: rank 0 writes <out_dir>/interrupted.json and the launcher's
        marker file; returns the record (also for the stage's summary)."""
        now = time.time()
        rec = {"reason": self.reason, "step": step, "saved": what, "time": now,
               "signal_to_save_seconds": (now - self.received_at) if self.received_at else None}
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "interrupted.json").write_text(json.dumps(rec, indent=2))
            marker = os.environ.get(MARKER_ENV)
            if marker:
                Path(marker).parent.mkdir(parents=True, exist_ok=True)
                Path(marker).write_text(json.dumps(dict(rec, out_dir=str(out_dir))))
            lat = rec["signal_to_save_seconds"]
            print(f"[stop] {self.reason}: saved {what} at step {step}"
                  + (f", {lat:.2f}s after the signal" if lat is not None else "")
                  + "; run the same command again to resume", flush=True)
        return rec


@contextmanager
def shield(signals=STOP_SIGNALS):
    """Block the stop signals in this (main) thread while helper processes may be started,
    e.g. megatron's checkpoint writer, whose spawned Manager process lives on. A child
    inherits the blocked mask, so Slurm's signal to every process of the step cannot kill
    it in the middle of the save that the signal asked for; this process still gets the
    signal (on another thread, or when the block ends) and its handler sets the flag."""
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, s) for s in signals})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def clear_record(out_dir) -> None:
    """A run that finished removes the stale interrupted.json of an earlier stop."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(out_dir) / "interrupted.json").unlink(missing_ok=True)
