"""The cached top-K KD loss (distill/topk.py) against a brute-force twin written here with
plain torch ops on the full vocabulary (log_softmax, topk, a boolean mask, autograd); and
the exact case K = vocabulary against the online full-vocabulary KL (distill/loss.py).
TP > 1: tests/dist/kd_loss_worker.py (the same cases with the vocabulary sharded)."""

import pytest
import torch

from megatron_minitron.distill.loss import forward_kl_reference, kd_loss
from megatron_minitron.distill.topk import teacher_topk, topk_forward_kl, topk_kd_loss

S, B, V = 7, 3, 53


def _logits(seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(S, B, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(S, B, V, generator=g, dtype=torch.float64) * scale
    return s.to(dtype), t.to(dtype)


def _twin_targets(t, k, T):
    """Brute force: the full log-softmax, its top k, and the log of the mass outside."""
    lp = torch.log_softmax(t.double() / T, -1)
    val, ids = lp.topk(k, -1)
    out = torch.ones_like(lp, dtype=torch.bool).scatter(-1, ids, False)
    rest = torch.where(out, lp, torch.tensor(float("-inf"), dtype=lp.dtype)).logsumexp(-1)
    return ids, val, rest, out


def _twin_kl(s, t, k, T):
    """KL over the K + 1 buckets (ids, everything else) by plain autograd ops."""
    ids, p_log, r_log, out = _twin_targets(t, k, T)
    q = torch.log_softmax(s / T, -1)
    q_ids = q.gather(-1, ids)
    q_rest = torch.where(out, q, torch.tensor(float("-inf"), dtype=q.dtype)).logsumexp(-1)
    P = torch.cat((p_log, r_log[..., None]), -1).exp()
    logQ = torch.cat((q_ids, q_rest[..., None]), -1)
    logP = torch.cat((p_log, r_log[..., None]), -1)
    return torch.where(P > 0, P * (logP - logQ), torch.zeros_like(P)).sum(-1)


@pytest.mark.parametrize("k", [1, 5, 52])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_teacher_topk_matches_brute_force(k, T):
    _, t = _logits(1)
    ids, lps, rest = teacher_topk(t, k, T, chunk_size=4)
    tid, tval, trest, _ = _twin_targets(t, k, T)
    assert torch.equal(ids, tid)
    assert (lps.double() - tval).abs().max() < 1e-6
    assert (rest.double() - trest).abs().max() < 1e-5
    assert lps.dtype == torch.float32 and rest.dtype == torch.float32


def test_teacher_topk_all_ids_has_no_rest():
    _, t = _logits(2)
    _, lps, rest = teacher_topk(t, V)
    assert torch.isinf(rest).all() and (rest < 0).all()
    assert (lps.double().exp().sum(-1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("k", [1, 8, 52])
@pytest.mark.parametrize("T,chunk", [(1.0, None), (2.0, 5), (0.7, 1)])
def test_topk_kl_and_grad_match_twin(k, T, chunk):
    s, t = _logits(3 + k)
    ids, lps, rest, _ = _twin_targets(t, k, T)
    a = s.clone().requires_grad_(True)
    kl = topk_forward_kl(a, ids, lps, rest, T, chunk_size=chunk)
    b = s.clone().requires_grad_(True)
    twin = _twin_kl(b, t, k, T)
    w = torch.rand(S, B, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (kl * w).sum().backward()
    (twin * w).sum().backward()
    assert (kl - twin).abs().max() < 1e-12
    assert (a.grad - b.grad).abs().max() < 1e-12
    assert (kl >= -1e-12).all()


@pytest.mark.parametrize("T", [1.0, 1.5])
def test_k_equal_vocab_is_the_online_kd_loss(T):
    """K = V: no mass outside, the loss and its gradient are the full forward KL's."""
    s, t = _logits(4, torch.float32)
    ids, lps, rest = teacher_topk(t, V, T)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(5)) > 0.3).float()
    a = s.clone().requires_grad_(True)
    loss, logs = topk_kd_loss(a, ids, lps, rest, loss_mask=mask, temperature=T, chunk_size=4)
    loss.backward()
    b = s.clone().requires_grad_(True)
    ref, _ = kd_loss(b, t, loss_mask=mask, temperature=T)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-6
    assert (a.grad - b.grad).abs().max() < 1e-7
    c = s.double().clone().requires_grad_(True)  # and against torch's kl_div in fp64
    ids64, lps64, rest64 = teacher_topk(t.double(), V, T)
    kl = topk_forward_kl(c, ids64, lps64.double(), rest64.double(), T)
    assert (kl - forward_kl_reference(s.double(), t.double(), T)).abs().max() < 1e-6  # fp32-stored log-probs


def test_kd_mix_with_ce_and_bf16_student():
    s, t = _logits(6, torch.float32)
    ids, lps, rest = teacher_topk(t, 8)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    loss, logs = topk_kd_loss(s, ids, lps, rest, labels=labels, alpha_kd=0.5)
    kl_mean = topk_forward_kl(s, ids, lps, rest).mean()
    ce, _ = kd_loss(s, None, labels, alpha_kd=0.0)
    assert abs(loss.item() - (0.5 * kl_mean.item() + 0.5 * ce.item())) < 1e-6
    assert set(logs) == {"kd", "ce"}
    bf = topk_forward_kl(s.bfloat16(), ids, lps, rest)  # computed in fp32
    assert bf.dtype == torch.float32
    assert (bf - topk_forward_kl(s.bfloat16().float(), ids, lps, rest)).abs().max() < 1e-6


def test_bad_shapes_and_k_refused():
    s, t = _logits(7)
    ids, lps, rest = teacher_topk(t, 4)
    with pytest.raises(ValueError, match="do not match"):
        topk_forward_kl(s[:, :2], ids, lps, rest)
    with pytest.raises(ValueError, match="top_k=54"):
        teacher_topk(t, V + 1)
