"""preempt.StopRequest in one process: signals, the wall-clock limit, handler chaining and
restoration, settings refused with a clear error. (Cross-rank agreement and the stages'
saves under torchrun: tests/dist/test_preempt_dist.py.)"""

import json
import os
import signal
import time

import pytest

from megatron_minitron.config import ConfigError, TrainConfig
from megatron_minitron.preempt import MARKER_ENV, StopRequest, clear_record


def test_signal_sets_the_stop_and_handlers_are_restored(tmp_path, monkeypatch):
    seen = []
    prev = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with StopRequest() as stop:
            assert stop.poll() is False
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            assert stop.poll() is True and stop.reason == "signal SIGUSR1"
            assert seen == [signal.SIGUSR1]  # the handler installed before is still called
            monkeypatch.setenv(MARKER_ENV, str(tmp_path / "marker"))
            rec = stop.record(tmp_path / "run", 7, "checkpoint")
        assert rec["step"] == 7 and 0 <= rec["signal_to_save_seconds"] < 5
        assert json.loads((tmp_path / "run" / "interrupted.json").read_text())["reason"] == "signal SIGUSR1"
        assert json.loads((tmp_path / "marker").read_text())["out_dir"] == str(tmp_path / "run")
        os.kill(os.getpid(), signal.SIGUSR1)  # the earlier handler is back in charge
        assert seen == [signal.SIGUSR1] * 2
        clear_record(tmp_path / "run")
        assert not (tmp_path / "run" / "interrupted.json").exists()
    finally:
        signal.signal(signal.SIGUSR1, prev)


def test_sigterm_also_stops():
    prev = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.poll() and stop.reason == "signal SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == prev


def test_exit_duration_minutes():
    with StopRequest(exit_duration_minutes=0.5, start_time=time.time() - 29) as stop:
        assert stop.poll() is False
    with StopRequest(exit_duration_minutes=0.5, start_time=time.time() - 31) as stop:
        assert stop.poll() is True and stop.reason == "exit_duration_minutes=0.5 reached"
    with StopRequest(exit_duration_minutes=0, start_time=0) as stop:  # 0 = no limit
        assert stop.poll() is False


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_minutes_are_refused(bad):
    with pytest.raises(ConfigError, match="exit_duration_minutes"):
        StopRequest(exit_duration_minutes=bad)
    with pytest.raises(ConfigError, match="train.exit_duration_minutes"):
        TrainConfig(exit_duration_minutes=bad).validate()


def test_shield_protects_helper_processes_started_inside_it():
    """A child started under shield() inherits the blocked stop signals (megatron's
    checkpoint writer spawns one); one started outside dies of SIGUSR1 as usual."""
    import subprocess
    import sys

    from megatron_minitron.preempt import shield

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with shield():
        inside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # mask restored
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        for p in (inside, outside):
            os.kill(p.pid, signal.SIGUSR1)
        assert outside.wait(timeout=10) == -signal.SIGUSR1
        time.sleep(0.3)
        assert inside.poll() is None
    finally:
        for p in (inside, outside):
            if p.poll() is None:
                p.kill()
                p.wait()
