"""Re-saving the iteration `latest` already names (a resumed run that stops before its first
step) swaps the new folder in without a moment where `latest` names nothing: by an atomic
exchange, or by two renames whose gap resolve() bridges with the `.old` copy."""

import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.model import build_model
from megatron_minitron.train import checkpoint as ckpt

CFG = ModelConfig(pattern="M-", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=2,
                  mamba_head_dim=16, mamba_num_groups=1, mamba_state_dim=8, vocab_size=64)


def _first_param(it):
    model = build_model(CFG, D.init(ParallelConfig(), seed=1), initialize=False)
    ckpt.load_model_weights(it, model)
    return next(model.parameters()).detach().clone()


def test_resave_same_iteration_exchange_and_fallback(tmp_path, monkeypatch):
    par = D.init(ParallelConfig(), seed=1)
    model = build_model(CFG, par)
    p = next(model.parameters())
    run = tmp_path / "run"
    ckpt.save(run, 5, CFG, {"model": model.sharded_state_dict()}, {})
    for fallback in (False, True):
        if fallback:
            monkeypatch.setenv(ckpt.NO_EXCHANGE_ENV, "1")
        with torch.no_grad():
            p.add_(1.0)
        want = p.detach().clone()
        it = ckpt.save(run, 5, CFG, {"model": model.sharded_state_dict()}, {})
        assert ckpt.resolve(run) == it
        assert torch.equal(_first_param(run), want)
        leftovers = sorted(x.name for x in (run / "checkpoints").iterdir())
        assert leftovers == ["iter_0000005", "latest"], leftovers
    # a kill between the fallback's two renames: the iteration folder is away at .old
    it = ckpt.resolve(run)
    it.rename(it.with_name(it.name + ".old"))
    assert ckpt.resolve(run) == it.with_name(it.name + ".old")
    assert torch.equal(_first_param(run), want)
