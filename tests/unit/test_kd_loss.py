"""Single-process parity tests for megatron_minitron.distill.loss (no communication path).

Tolerances (max abs error vs the plain-autograd full-vocab reference):
  float64: 1e-10 (loss and grad);  float32: 1e-5 (loss and grad).
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_minitron.distill.loss import (
    cross_entropy_reference,
    forward_kl_reference,
    kd_loss,
    vocab_parallel_cross_entropy,
    vocab_parallel_forward_kl,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
S, B, V = 7, 3, 53  # [s, b, v] Megatron layout; odd sizes so chunks do not divide evenly


def _logits(dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(S, B, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(S, B, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(S, B, generator=g, dtype=torch.float64).to(dtype)  # upstream grad
    return s, t, w


def _ref_kl(s, t, T):
    # The reference stated in the brief, written out here (not via the module's twin).
    return F.kl_div(
        F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
        reduction="none",
    ).sum(-1)


def _loss_and_grad(fn, s, w):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s)
    (g,) = torch.autograd.grad((out * w).sum(), s)
    return out.detach(), g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 100])
def test_forward_kl_matches_reference(dtype, temperature, chunk_size):
    s, t, w = _logits(dtype)
    out, g = _loss_and_grad(
        lambda x: vocab_parallel_forward_kl(x, t, temperature, chunk_size=chunk_size), s, w
    )
    ref, g_ref = _loss_and_grad(lambda x: _ref_kl(x, t, temperature), s, w)
    assert out.shape == (S, B) and out.dtype == dtype
    assert (out - ref).abs().max().item() < TOL[dtype]
    assert (g - g_ref).abs().max().item() < TOL[dtype]
    # The module's reference twin is the same formula.
    assert torch.allclose(forward_kl_reference(s, t, temperature), ref, atol=0, rtol=0)


def test_grad_formula_and_no_teacher_grad():
    s, t, w = _logits(torch.float64)
    T = 1.7
    s = s.requires_grad_(True)
    t = t.requires_grad_(True)
    out = vocab_parallel_forward_kl(s, t, T, chunk_size=5)
    (out * w).sum().backward()
    expected = (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)) / T * w.unsqueeze(-1)
    assert (s.grad - expected).abs().max().item() < 1e-12
    assert t.grad is None  # teacher is a constant


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_unchunked(dtype):
    s, t, w = _logits(dtype, seed=1)
    full, g_full = _loss_and_grad(lambda x: vocab_parallel_forward_kl(x, t, 1.3), s, w)
    for cs in (1, 2, 5, S * B - 1, S * B):
        part, g_part = _loss_and_grad(
            lambda x: vocab_parallel_forward_kl(x, t, 1.3, chunk_size=cs), s, w
        )
        # Row-wise math is identical per token; only the loop differs (reduction kernels may
        # still vectorise differently with the row count, hence a tiny tolerance).
        tol = 1e-13 if dtype == torch.float64 else 1e-6
        assert (part - full).abs().max().item() <= tol
        assert (g_part - g_full).abs().max().item() <= tol


def test_kl_of_identical_logits_is_zero():
    s, _, w = _logits(torch.float64, seed=2)
    out, g = _loss_and_grad(lambda x: vocab_parallel_forward_kl(x, s.detach(), 2.0), s, w)
    assert out.abs().max().item() < 1e-12
    assert g.abs().max().item() < 1e-15


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bf16_inputs_computed_in_fp32(temperature):
    s, t, w = _logits(torch.float32, seed=3)
    sb, tb = s.bfloat16(), t.bfloat16()
    out, g = _loss_and_grad(
        lambda x: vocab_parallel_forward_kl(x, tb, temperature, chunk_size=4), sb, w
    )
    assert out.dtype == torch.float32 and g.dtype == torch.bfloat16
    # Reference on the exact same (bf16-representable) values, in fp64.
    ref, g_ref = _loss_and_grad(lambda x: _ref_kl(x, tb.double(), temperature), sb.double(), w)
    assert (out.double() - ref).abs().max().item() < 1e-5
    # The gradient is rounded to bf16 once at the end (relative error <= 2^-8).
    assert (g.double() - g_ref).abs().max().item() <= 2**-8 * g_ref.abs().max().item()


def test_inputs_not_modified():
    s, t, w = _logits(torch.float32, seed=4)
    s0, t0 = s.clone(), t.clone()
    labels = torch.randint(0, V, (B, S))
    _loss_and_grad(lambda x: kd_loss(x, t, labels, alpha_kd=0.5, chunk_size=3)[0] * 1.0, s, 1.0)
    assert torch.equal(s, s0) and torch.equal(t, t0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_cross_entropy_matches_torch(dtype, chunk_size):
    s, _, w = _logits(dtype, seed=5)
    labels = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(5))
    out, g = _loss_and_grad(
        lambda x: vocab_parallel_cross_entropy(x, labels, chunk_size=chunk_size), s, w
    )
    ref, g_ref = _loss_and_grad(
        lambda x: F.cross_entropy(x.reshape(-1, V), labels.reshape(-1), reduction="none").view(
            S, B
        ),
        s,
        w,
    )
    assert (out - ref).abs().max().item() < TOL[dtype]
    assert (g - g_ref).abs().max().item() < TOL[dtype]
    assert torch.allclose(cross_entropy_reference(s, labels), ref, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_alpha_mix_and_mask(alpha):
    s, t, _ = _logits(torch.float64, seed=6)
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, V, (B, S), generator=g)  # [b, s] Megatron data layout
    loss_mask = (torch.rand(B, S, generator=g) > 0.3).float()
    T = 2.0

    s_var = s.clone().requires_grad_(True)
    loss, logs = kd_loss(
        s_var, t, labels, loss_mask, temperature=T, alpha_kd=alpha, chunk_size=4
    )
    (grad,) = torch.autograd.grad(loss, s_var)

    s_ref = s.clone().requires_grad_(True)
    m = loss_mask.t()  # [s, b]
    kd = (_ref_kl(s_ref, t, T) * m).sum() / m.sum()
    ce = (
        F.cross_entropy(s_ref.reshape(-1, V), labels.t().reshape(-1), reduction="none").view(S, B)
        * m
    ).sum() / m.sum()
    ref = alpha * kd + (1 - alpha) * ce
    (grad_ref,) = torch.autograd.grad(ref, s_ref)

    assert abs(loss.item() - ref.item()) < 1e-10
    assert (grad - grad_ref).abs().max().item() < 1e-10
    assert loss.dim() == 0
    if alpha > 0:
        assert abs(logs["kd"].item() - kd.item()) < 1e-10
    else:
        assert "kd" not in logs
    if alpha < 1:
        assert abs(logs["ce"].item() - ce.item()) < 1e-10
    else:
        assert "ce" not in logs  # CE is not computed for pure KD


def test_kd_loss_ce_only_needs_no_teacher():
    s, _, _ = _logits(torch.float64, seed=7)
    labels = torch.randint(0, V, (B, S))
    loss, logs = kd_loss(s, None, labels, alpha_kd=0.0)
    ref = F.cross_entropy(s.reshape(-1, V), labels.t().reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-10 and set(logs) == {"ce"}


def test_kd_loss_all_masked_is_zero():
    s, t, _ = _logits(torch.float64, seed=8)
    loss, _ = kd_loss(s, t, loss_mask=torch.zeros(B, S))
    assert loss.item() == 0.0


def test_mismatched_vocab_raises():
    s = torch.randn(S, B, V)
    t = torch.randn(S, B, V + 3)
    msg = f"teacher vocab {V + 3} != student vocab {V}; distillation needs a shared vocabulary"
    with pytest.raises(ValueError, match=msg):
        vocab_parallel_forward_kl(s, t)
    with pytest.raises(ValueError, match="shared vocabulary"):
        kd_loss(s, t)


def test_bad_arguments_raise():
    s, t, _ = _logits(torch.float32)
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_forward_kl(s, t[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_forward_kl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_forward_kl(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="labels are required"):
        kd_loss(s, t, alpha_kd=0.5)
    with pytest.raises(ValueError, match="teacher_logits are required"):
        kd_loss(s, None, alpha_kd=0.5, labels=torch.zeros(B, S, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_mask"):
        kd_loss(s, t, loss_mask=torch.ones(S, B))  # [s, b] instead of [b, s]
    with pytest.raises(ValueError, match="alpha_kd"):
        kd_loss(s, t, alpha_kd=1.5)
