"""The Mamba dt clamp reaches megatron's scan calls (compat/dt_limit.py) on real
megatron-core mixers: the chunked scan (CPU fallback here, mamba_ssm's kernel on GPU) and
the fused mem-eff scan both receive dt_limit; unclamped models pass none; cached decoding
of a clamped model is refused. (Its numbers against transformers' NemotronH:
tests/dist/test_dtclamp_dist.py.)"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.model import build_model, causal_mask

pytestmark = pytest.mark.smoke

CFG = ModelConfig(pattern="M-M", hidden_size=32, ffn_hidden_size=48, mamba_num_heads=4,
                  mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=8,
                  vocab_size=64, seq_length=16)
CLAMP = (0.05, float("inf"))


@pytest.fixture(scope="module")
def par():
    return D.init(ParallelConfig(), seed=3)


def _models(par):
    free = build_model(CFG, par).eval()
    clamped = build_model(dataclasses.replace(CFG, mamba_dt_clamp_min=CLAMP[0]), par).eval()
    with torch.no_grad():
        for name, p in free.named_parameters():
            if name.endswith("dt_bias"):
                p.fill_(-6.0)  # softplus(dt) ~ 0.0025: the clamp at 0.05 binds
    clamped.load_state_dict(free.state_dict())
    return free, clamped


def _forward(model):
    tok = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tok, torch.arange(16)[None].expand(2, -1), causal_mask(16))


def _recorder(mod, name, monkeypatch, fake=None):
    seen = []
    inner = fake or getattr(mod, name)

    def record(*args, **kwargs):
        seen.append(kwargs.get("dt_limit"))
        return inner(*args, **kwargs)

    monkeypatch.setattr(mod, name, record, raising=False)  # absent without mamba_ssm
    return seen


def test_chunked_scan_gets_the_limit(par, monkeypatch):
    from megatron_minitron.compat import dt_limit, mcore

    free, clamped = _models(par)
    seen = _recorder(mcore.mamba_mixer_module, "mamba_chunk_scan_combined", monkeypatch)
    dt_limit.install(mcore.mamba_mixer_module)  # wraps the recorder as it wraps the kernel
    a, b = _forward(free), _forward(clamped)
    assert seen == [None, None, CLAMP, CLAMP]  # two Mamba layers per model
    assert (a - b).abs().max() > 1e-3  # and it changes the function


def test_fused_scan_gets_the_limit(par, monkeypatch):
    from megatron_minitron.compat import dt_limit, mcore

    _, clamped = _models(par)
    d_inner = CFG.mamba_num_heads * CFG.mamba_head_dim

    def fused(zxbcdt, *args, **kwargs):  # mamba_ssm's kernel needs CUDA: shape stand-in
        return torch.zeros(zxbcdt.shape[0], zxbcdt.shape[1], d_inner)

    seen = _recorder(mcore.mamba_mixer_module, "mamba_split_conv1d_scan_combined", monkeypatch, fused)
    dt_limit.install(mcore.mamba_mixer_module)
    for m in clamped.modules():
        if isinstance(m, mcore.MambaMixer):
            m.use_mem_eff_path = True
    _forward(clamped)
    assert seen == [CLAMP, CLAMP]


def test_cached_decoding_of_a_clamped_model_is_refused(par):
    from megatron_minitron.compat import mcore

    _, clamped = _models(par)
    mixer = next(m for m in clamped.modules() if isinstance(m, mcore.MambaMixer))
    with pytest.raises(NotImplementedError, match="mamba_dt_clamp_min"):
        mixer(torch.zeros(4, 1, CFG.hidden_size), inference_context=SimpleNamespace())
