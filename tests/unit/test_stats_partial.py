"""The stats stage's partial-state writer (importance/stage.PartialWriter) in one process:
saves run in a background thread; `latest` moves only to a step that every rank finished
writing (confirmed at the NEXT save point, or at once with sync=True); older steps go."""

import threading

import torch

from megatron_minitron.importance.stage import PartialWriter, _load_partial


class _Acc:
    """Stands in for the StatsCollector: state_dict / load_state_dict of a dict of tensors."""

    def __init__(self, v: float):
        self.acc = {"samples": torch.tensor(v, dtype=torch.float64), "L0.x": torch.full((4,), v)}

    def state_dict(self):
        return {k: t.clone() for k, t in self.acc.items()}

    def load_state_dict(self, sd):
        for k, t in sd.items():
            self.acc[k].copy_(t)


def test_latest_moves_only_to_confirmed_steps(tmp_path):
    fp = {"run": 1}
    w = PartialWriter(tmp_path, fp, "cpu")
    w.save(2, _Acc(2.0))  # written in the background, not yet confirmed
    assert not (tmp_path / "partial" / "latest").exists()
    gate = threading.Event()
    real = torch.save

    def slow_save(obj, f, *a, **k):  # step 4's write stalls: a crash now must leave step 2
        gate.wait(10)
        return real(obj, f, *a, **k)

    torch.save = slow_save
    try:
        w.save(4, _Acc(4.0))  # joins step 2's write, confirms it, starts step 4's
        assert (tmp_path / "partial" / "latest").read_text() == "step_0000002"
        assert not (tmp_path / "partial" / "step_0000004" / "rank_00000.pt").exists()
        # a resume at this moment (the crash case) reads step 2
        acc = _Acc(0.0)
        assert _load_partial(tmp_path, fp, acc) == 2 and float(acc.acc["samples"]) == 2.0
    finally:
        gate.set()
        torch.save = real
    w.save(6, _Acc(6.0), sync=True)  # confirms 4, writes and confirms 6
    part = tmp_path / "partial"
    assert (part / "latest").read_text() == "step_0000006"
    assert sorted(p.name for p in part.glob("step_*")) == ["step_0000006"]
    acc = _Acc(0.0)
    assert _load_partial(tmp_path, fp, acc) == 6 and torch.equal(acc.acc["L0.x"], torch.full((4,), 6.0))
    w.discard()


def test_a_failed_write_is_raised_in_the_main_thread(tmp_path):
    w = PartialWriter(tmp_path, {}, "cpu")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "step_0000002").write_text("a file where a folder belongs")
    w.save(2, _Acc(1.0))
    try:
        w.discard()
    except OSError:
        pass
    else:
        raise AssertionError("the background write's error was swallowed")
