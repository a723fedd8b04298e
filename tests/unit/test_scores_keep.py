"""Pure importance scores and keep sets vs plainly written float64 loops.

Tolerances: fp32 results vs float64 loop references, rtol 1e-5 / atol 1e-6 unless stated.
"""

import math

import pytest
import torch

from megatron_minitron.importance import scores as S
from megatron_minitron.plan import keep as K

RT, AT = 1e-5, 1e-6


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _close(actual, expected, rtol=RT, atol=AT):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


# ----------------------------------------------------------------------------- aggregation


def _agg_ref(act, mask=None):
    """act [s, b, f] -> sum_b (mean_s |act|)^2, explicit loops in float64."""
    s, b, f = act.shape
    out = [0.0] * f
    for j in range(f):
        for bi in range(b):
            tot, n = 0.0, 0
            for si in range(s):
                if mask is None or mask[si, bi]:
                    tot += abs(float(act[si, bi, j]))
                    n += 1
            mean = tot / n if n else 0.0
            out[j] += mean * mean
    return torch.tensor(out, dtype=torch.float64)


def test_aggregate_batch_matches_loops():
    act = torch.randn(5, 3, 4, generator=_g())
    got = S.aggregate_batch(act)
    assert got.dtype == torch.float32 and got.shape == (4,)
    _close(got, _agg_ref(act))


def test_aggregate_batch_mask_and_layouts():
    act = torch.randn(6, 4, 3, generator=_g(1))
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[3:, 0] = False  # padded tail of sample 0
    mask[:, 2] = False  # fully padded sample contributes 0
    mask[0, 3] = False
    ref = _agg_ref(act, mask)
    _close(S.aggregate_batch(act, mask), ref)
    # [batch, seq, feat] layout with a [batch, seq] mask gives the same result
    _close(S.aggregate_batch(act.transpose(0, 1), mask.T, token_dim=1, batch_dim=0), ref)
    # padding values are ignored
    act2 = act.clone()
    act2[3:, 0] = 1e6
    _close(S.aggregate_batch(act2, mask), ref)
    # bf16 input is accumulated in fp32
    assert S.aggregate_batch(act.bfloat16(), mask).dtype == torch.float32


def test_aggregate_batch_multi_feature_dims():
    act = torch.randn(4, 3, 2, 5, generator=_g(2))
    got = S.aggregate_batch(act)
    assert got.shape == (2, 5)
    _close(got.reshape(-1), _agg_ref(act.reshape(4, 3, 10)))


def test_accumulation_is_additive_and_finalize_is_l2():
    act = torch.randn(7, 6, 5, generator=_g(3))
    mask = torch.rand(7, 6, generator=_g(4)) > 0.3
    full = S.aggregate_batch(act, mask)
    halves = S.aggregate_batch(act[:, :2], mask[:, :2]) + S.aggregate_batch(act[:, 2:], mask[:, 2:])
    _close(halves, full)
    # finalize = L2 over all samples of the per-sample mean |act|
    per_sample = torch.stack(
        [
            torch.stack([act[mask[:, b], b, j].abs().double().mean() for j in range(5)])
            if mask[:, b].any()
            else torch.zeros(5, dtype=torch.float64)
            for b in range(6)
        ]
    )
    _close(S.finalize(full), per_sample.norm(dim=0))


def test_aggregate_batch_errors():
    with pytest.raises(ValueError, match="mask shape"):
        S.aggregate_batch(torch.randn(4, 3, 2), torch.ones(3, 4))
    with pytest.raises(ValueError, match=">= 2 dims"):
        S.aggregate_batch(torch.randn(4))


# ----------------------------------------------------------------------------- Mamba scores


def test_mamba_channel_and_head_scores():
    nheads, headdim = 6, 5
    a = torch.rand(nheads, headdim, generator=_g(5))
    ch = S.mamba_channel_scores(a)
    ref_ch = [math.sqrt(sum(float(a[h, p]) ** 2 for h in range(nheads))) for p in range(headdim)]
    _close(ch, ref_ch)
    kept = [4, 0, 2]
    hs = S.mamba_head_scores(a, torch.tensor(kept))
    ref_h = [math.sqrt(sum(float(a[h, p]) ** 2 for p in kept)) for h in range(nheads)]
    _close(hs, ref_h)
    ref_all = [math.sqrt(sum(float(a[h, p]) ** 2 for p in range(headdim))) for h in range(nheads)]
    _close(S.mamba_head_scores(a), ref_all)
    # flat d_inner vector in h*headdim + p layout
    _close(S.as_head_matrix(a.reshape(-1), nheads), a)
    with pytest.raises(ValueError, match="kept_channels"):
        S.mamba_head_scores(a, [5])
    with pytest.raises(ValueError, match=r"\[nheads, headdim\]"):
        S.mamba_channel_scores(a.reshape(-1))
    with pytest.raises(ValueError, match="divisible"):
        S.as_head_matrix(torch.ones(7), 2)


# ----------------------------------------------------------------------------- FLAP


def test_flap_moments_variance_and_scores():
    nheads, headdim, hidden = 3, 4, 5
    d = nheads * headdim
    y = torch.randn(6, 2, d, generator=_g(6)) + 3.0
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[4:, 1] = False
    w = torch.randn(hidden, d, generator=_g(7))
    count, s1, s2 = S.flap_moments(y, mask)
    assert float(count) == 10
    # additivity over two halves of the batch (and hence over DP ranks)
    parts = [S.flap_moments(y[:, i : i + 1], mask[:, i : i + 1]) for i in range(2)]
    _close(parts[0][0] + parts[1][0], count)
    _close(parts[0][1] + parts[1][1], s1)
    _close(parts[0][2] + parts[1][2], s2)

    toks = [[float(y[s, b, j]) for s in range(6) for b in range(2) if mask[s, b]] for j in range(d)]
    var_ref = []
    for col in toks:
        m = sum(col) / len(col)
        var_ref.append(sum((v - m) ** 2 for v in col) / (len(col) - 1))
    _close(S.flap_variance(count, s1, s2), var_ref, rtol=1e-4)
    col_ref = [sum(float(w[i, j]) ** 2 for i in range(hidden)) * var_ref[j] for j in range(d)]
    cs = S.flap_column_scores(w, count, s1, s2)
    _close(cs, col_ref, rtol=1e-4)
    head_ref = [sum(col_ref[h * headdim + p] for p in range(headdim)) for h in range(nheads)]
    chan_ref = [sum(col_ref[h * headdim + p] for h in range(nheads)) for p in range(headdim)]
    _close(S.flap_head_scores(cs, nheads, headdim), head_ref, rtol=1e-4)
    _close(S.flap_channel_scores(cs, nheads, headdim), chan_ref, rtol=1e-4)
    # biased variance option
    nb = [sum((v - sum(c) / len(c)) ** 2 for v in c) / len(c) for c in toks]
    _close(S.flap_variance(count, s1, s2, unbiased=False), nb, rtol=1e-4)
    # constant column -> variance 0 (never negative)
    yc = torch.full((5, 2, 3), 7.3)
    assert (S.flap_variance(*S.flap_moments(yc)).abs() < 1e-12).all()
    assert s1.dtype == s2.dtype == count.dtype == torch.float64


def test_flap_errors():
    with pytest.raises(ValueError, match="tokens"):
        S.flap_variance(1, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="w_out"):
        S.flap_column_scores(torch.ones(4, 6), 5, torch.ones(5), torch.ones(5))
    with pytest.raises(ValueError, match="col_scores"):
        S.flap_head_scores(torch.ones(10), 3, 4)


# ----------------------------------------------------------------------------- FFN / attn / emb


def test_ffn_attention_embedding_scores():
    f = torch.rand(9, generator=_g(8))
    _close(S.ffn_neuron_scores(f), f)
    nh, kv = 4, 3
    a = torch.rand(nh * kv, generator=_g(9))
    ref = [math.sqrt(sum(float(a[h * kv + c]) ** 2 for c in range(kv))) for h in range(nh)]
    _close(S.attention_head_scores(a, nh), ref)
    _close(S.attention_head_scores(a.reshape(nh, kv), nh), ref)
    layers = [torch.rand(5, generator=_g(10 + i)) for i in range(4)]
    ref_e = [sum(float(t[i]) for t in layers) for i in range(5)]
    _close(S.embedding_channel_scores(layers), ref_e)
    _close(S.embedding_channel_scores(torch.stack(layers)), ref_e)
    with pytest.raises(ValueError):
        S.embedding_channel_scores([])
    with pytest.raises(ValueError):
        S.ffn_neuron_scores(torch.ones(2, 2))
    with pytest.raises(ValueError, match="num_heads"):
        S.attention_head_scores(torch.ones(3, 4), 4)


# ----------------------------------------------------------------------------- MoE


def test_router_increment_and_segment_sum():
    probs = torch.tensor([[0.7, 0.0, 0.3], [0.0, 0.4, 0.6], [0.9, 0.1, 0.0]])
    chosen = probs > 0
    mass, freq = S.router_increment(probs, chosen)
    _close(mass, [1.6, 0.5, 0.9])
    _close(freq, [2, 2, 2])
    assert mass.dtype == freq.dtype == torch.float64
    # a weight outside the choice is not counted
    mass2, _ = S.router_increment(probs + 1.0, chosen)
    _close(mass2, [3.6, 2.5, 2.9])
    v = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    _close(S.segment_sum(v, [2, 0, 3]), [[2, 4], [0, 0], [18, 21]])
    _close(S.segment_sum(v[:, 0], torch.tensor([1, 4])), [0, 20])
    with pytest.raises(ValueError, match="add up"):
        S.segment_sum(v, [2, 2])
    with pytest.raises(ValueError, match="tokens, experts"):
        S.router_increment(probs, chosen[:2])


def test_expert_scores_divide_out_token_copies():
    mass, freq = torch.tensor([1.5, 0.0, 2.0]), torch.tensor([3.0, 0.0, 4.0])
    out = torch.tensor([6.0, 0.0, 10.0])
    one = S.expert_scores(mass, freq, out, freq)
    _close(one["out"], out)
    _close(one["mass"], mass)
    _close(one["freq"], freq)
    # TP=2 without sequence parallelism: the experts saw every token twice
    two = S.expert_scores(mass, freq, 2 * out, 2 * freq)
    for k in one:
        _close(two[k], one[k])
        assert two[k].dtype == torch.float32
    with pytest.raises(ValueError, match="one multiple"):
        S.expert_scores(mass, freq, out, torch.tensor([3.0, 0.0, 8.0]))
    with pytest.raises(ValueError, match="not given"):
        S.expert_scores(mass, freq, out, torch.tensor([3.0, 1.0, 4.0]))


def test_expert_ffn_scores_are_rms_over_routed_tokens():
    g = _g(21)
    a = [torch.rand(n, 4, generator=g) for n in (5, 0, 2)]  # tokens routed to each expert
    sumsq = torch.stack([t.double().pow(2).sum(0) for t in a])
    seen = torch.tensor([5.0, 0.0, 2.0])
    ref = [[math.sqrt(sum(float(t[i, j]) ** 2 for i in range(t.shape[0])) / max(t.shape[0], 1))
            for j in range(4)] for t in a]
    _close(S.expert_ffn_scores(sumsq, seen), ref)
    _close(S.expert_ffn_scores(3 * sumsq, 3 * seen), ref)  # token copies divide out
    with pytest.raises(ValueError):
        S.expert_ffn_scores(sumsq, seen[:2])


# ----------------------------------------------------------------------------- depth


def _kl_ref(p, q):
    """per-token KL(softmax p || softmax q), float64 loops over the vocab."""
    pv = [math.exp(float(x)) for x in p]
    qv = [math.exp(float(x)) for x in q]
    zp, zq = sum(pv), sum(qv)
    return sum((a / zp) * (math.log(a / zp) - math.log(b / zq)) for a, b in zip(pv, qv))


def test_kl_next_token():
    s, b, v = 4, 2, 11
    p = torch.randn(s, b, v, generator=_g(20)) * 2
    q = torch.randn(s, b, v, generator=_g(21)) * 2
    per = torch.tensor([[_kl_ref(p[i, j], q[i, j]) for j in range(b)] for i in range(s)])
    _close(S.kl_next_token(p, q), per.mean(), rtol=1e-5)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    _close(S.kl_next_token(p, q, mask), per[mask].mean(), rtol=1e-5)
    _close(S.kl_next_token(p, q, mask, reduction="sum"), per[mask].sum(), rtol=1e-5)
    assert S.kl_next_token(p, q, reduction="none").shape == (s, b)
    # identical logits -> 0; shifted logits (same softmax) -> 0; different -> > 0
    assert float(S.kl_next_token(p, p)) == 0.0
    assert float(S.kl_next_token(p, p + 5.0)) < 1e-6
    assert float(S.kl_next_token(p, q)) > 0
    # bf16 logits are computed in fp32
    assert S.kl_next_token(p.bfloat16(), q.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="shapes differ"):
        S.kl_next_token(p, q[..., :-1])
    with pytest.raises(ValueError, match="mask shape"):
        S.kl_next_token(p, q, mask.T)
    with pytest.raises(ValueError, match="reduction"):
        S.kl_next_token(p, q, reduction="max")


def test_block_influence():
    h_in = torch.randn(3, 2, 8, generator=_g(22))
    h_out = torch.randn(3, 2, 8, generator=_g(23))
    ref = []
    for i in range(3):
        for j in range(2):
            x, y = h_in[i, j].double(), h_out[i, j].double()
            dot = sum(float(a) * float(b) for a, b in zip(x, y))
            norm = math.sqrt(float((x * x).sum())) * math.sqrt(float((y * y).sum()))
            ref.append(1 - dot / norm)
    _close(S.block_influence(h_in, h_out), sum(ref) / len(ref))
    assert abs(float(S.block_influence(h_in, h_in))) < 1e-6
    assert abs(float(S.block_influence(h_in, 3 * h_in))) < 1e-6  # scale-invariant
    mask = torch.tensor([[1, 0], [1, 1], [0, 0]])
    _close(S.block_influence(h_in, h_out, mask), (ref[0] + ref[2] + ref[3]) / 3)
    with pytest.raises(ValueError, match="no token"):
        S.block_influence(h_in, h_out, torch.zeros(3, 2))


# ----------------------------------------------------------------------------- top-k


def _topk_ref(scores, k):
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]


def test_topk_deterministic_with_ties():
    s = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 1.0, -0.0, 0.0])
    assert K.topk_indices(s, 8).tolist() == [1, 2, 4, 0, 5, 3, 6, 7]
    assert K.topk_indices(s, 3).tolist() == [1, 2, 4]
    assert K.topk_indices(s, 0).tolist() == []
    assert K.topk_indices(s, 3).dtype == torch.long
    g = _g(30)
    for _ in range(20):
        r = torch.randint(0, 4, (37,), generator=g).float()  # many ties
        k = int(torch.randint(0, 38, (1,), generator=g))
        assert K.topk_indices(r, k).tolist() == _topk_ref(r, k)
    with pytest.raises(ValueError, match="NaN"):
        K.topk_indices(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="k must"):
        K.topk_indices(s, 9)
    with pytest.raises(ValueError, match="1-D"):
        K.topk_indices(s.reshape(2, 4), 1)


# ----------------------------------------------------------------------------- Mamba keep


def _mamba_ref(head_scores, channel_scores, ngroups, keep_heads, keep_channels):
    nheads = len(head_scores)
    per = nheads // ngroups
    heads = []
    for g in range(ngroups):
        members = list(range(g * per, (g + 1) * per))
        members.sort(key=lambda h: (-float(head_scores[h]), h))
        heads += members[: keep_heads // ngroups]
    return heads, _topk_ref(channel_scores, keep_channels)


def test_mamba_keep_sets_group_rule():
    nheads, headdim, ngroups = 12, 8, 3
    per = nheads // ngroups
    g = _g(40)
    for keep_heads in (3, 6, 9, 12):
        hs = torch.rand(nheads, generator=g)
        hs[5] = hs[6]  # a tie inside group 1
        cs = torch.rand(headdim, generator=g)
        heads, chans = K.mamba_keep_sets(hs, cs, ngroups, keep_heads, 5)
        assert heads.dtype == torch.long and chans.dtype == torch.long
        assert (heads.tolist(), chans.tolist()) == _mamba_ref(hs, cs, ngroups, keep_heads, 5)
        k = keep_heads // ngroups
        for grp in range(ngroups):
            block = heads[grp * k : (grp + 1) * k]
            assert ((block // per) == grp).all()  # every kept head of slot g is in group g
            assert (hs[block][:-1] >= hs[block][1:]).all()  # descending within the group
        assert len(set(heads.tolist())) == keep_heads
    # a globally-better head in a full group cannot displace a group's own heads
    hs = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4])
    heads, _ = K.mamba_keep_sets(hs, torch.ones(4), 2, 4, 4)
    assert heads.tolist() == [0, 1, 7, 6]


def test_mamba_channel_set_shared_and_flat_indices():
    heads = torch.tensor([1, 0, 5, 4])
    chans = torch.tensor([3, 0])
    flat = K.mamba_flat_indices(heads, chans, headdim=4)
    ref = [h * 4 + p for h in heads.tolist() for p in chans.tolist()]
    assert flat.tolist() == ref
    # the same channel offsets in every kept head
    assert {(i % 4) for i in flat.tolist()} == {0, 3}
    for h in heads.tolist():
        assert [i % 4 for i in flat.tolist() if i // 4 == h] == chans.tolist()
    # keep-all: a within-group permutation of range(d_inner) per group
    nheads, headdim, ngroups = 8, 3, 2
    hs, cs = torch.rand(nheads, generator=_g(41)), torch.rand(headdim, generator=_g(42))
    h_all, c_all = K.mamba_keep_sets(hs, cs, ngroups, nheads, headdim)
    flat = K.mamba_flat_indices(h_all, c_all, headdim)
    size = nheads * headdim // ngroups
    for grp in range(ngroups):
        assert sorted(flat[grp * size : (grp + 1) * size].tolist()) == list(
            range(grp * size, (grp + 1) * size)
        )
    with pytest.raises(ValueError, match="channel indices"):
        K.mamba_flat_indices(heads, torch.tensor([4]), 4)


def test_mamba_keep_permutation_equivariance():
    nheads, ngroups, headdim = 12, 3, 6
    per = nheads // ngroups
    hs = torch.randperm(nheads, generator=_g(43)).float()  # distinct scores
    cs = torch.rand(headdim, generator=_g(44))
    heads, chans = K.mamba_keep_sets(hs, cs, ngroups, 6, 4)
    # permute heads within each group: perm[new] = old
    perm = torch.cat([g * per + torch.randperm(per, generator=_g(45 + g)) for g in range(ngroups)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(nheads)
    heads_p, chans_p = K.mamba_keep_sets(hs[perm], cs, ngroups, 6, 4)
    assert heads_p.tolist() == inv[heads].tolist()  # same heads, relabelled, same order
    assert chans_p.tolist() == chans.tolist()
    # permuting channels permutes the channel set the same way
    cperm = torch.randperm(headdim, generator=_g(50))
    cinv = torch.empty_like(cperm)
    cinv[cperm] = torch.arange(headdim)
    _, chans_c = K.mamba_keep_sets(hs, cs[cperm], ngroups, 6, 4)
    assert chans_c.tolist() == cinv[chans].tolist()


@pytest.mark.parametrize(
    "keep_heads, keep_channels, match",
    [
        (5, 4, r"keep_heads=5 .*multiple of ngroups=2.*alternatives: 4 or 6"),
        (10, 4, r"keep_heads=10 .*alternatives: 8"),
        (0, 4, r"keep_heads=0 .*alternatives: 2 or 4"),
        (4, 5, r"keep_channels=5 .*between 1 and 4 .*alternative: 4"),
        (4, 0, r"keep_channels=0 .*alternative: 1"),
    ],
)
def test_mamba_keep_errors(keep_heads, keep_channels, match):
    with pytest.raises(ValueError, match=match):
        K.mamba_keep_sets(torch.rand(8), torch.rand(4), 2, keep_heads, keep_channels)


def test_mamba_keep_bad_groups():
    with pytest.raises(ValueError, match="divisible by ngroups"):
        K.mamba_keep_sets(torch.rand(9), torch.rand(4), 2, 4, 4)


# ----------------------------------------------------------------------------- FFN / hidden


def test_ffn_and_hidden_keep():
    s = torch.rand(20, generator=_g(60))
    assert K.ffn_keep(s, 7).tolist() == _topk_ref(s, 7)
    assert K.hidden_keep(s, 20).tolist() == _topk_ref(s, 20)
    with pytest.raises(ValueError, match="ffn_hidden_size=21"):
        K.ffn_keep(s, 21)
    with pytest.raises(ValueError, match="hidden_size=0"):
        K.hidden_keep(s, 0)


# ----------------------------------------------------------------------------- attention


def test_attention_keep_gqa():
    num_heads, groups, kv = 8, 2, 3
    hs = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6])
    heads = K.attention_keep(hs, groups, 4)
    assert heads.tolist() == [1, 2, 4, 6]
    ref, _ = _mamba_ref(hs, [1.0], groups, 4, 1)
    assert heads.tolist() == ref
    with pytest.raises(ValueError, match="keep_heads=3"):
        K.attention_keep(hs, groups, 3)
    q = K.attention_flat_indices(heads, kv)
    assert q.tolist() == [h * kv + c for h in heads.tolist() for c in range(kv)]
    # fused linear_qkv rows: per group [q heads (per=4) | k | v], block (4+2)*kv = 18 rows
    rows = K.attention_qkv_rows(heads, num_heads, groups, kv)
    per, block = num_heads // groups, (num_heads // groups + 2) * kv
    ref_rows = []
    for g in range(groups):
        for h in heads.tolist()[g * 2 : (g + 1) * 2]:
            ref_rows += [g * block + (h - g * per) * kv + c for c in range(kv)]
        ref_rows += [g * block + per * kv + c for c in range(kv)]
        ref_rows += [g * block + (per + 1) * kv + c for c in range(kv)]
    assert rows.tolist() == ref_rows
    # keep-all rows are a within-group permutation of all rows
    all_rows = K.attention_qkv_rows(K.attention_keep(hs, groups, 8), num_heads, groups, kv)
    assert sorted(all_rows.tolist()) == list(range(groups * block))
    with pytest.raises(ValueError, match="not all in query group"):
        K.attention_qkv_rows(torch.tensor([4, 1, 0, 6]), num_heads, groups, kv)


# ----------------------------------------------------------------------------- depth


def test_layers_to_drop():
    pattern = "M-M*-M|M-*-M"  # 11 layers; M at 0, 2, 5, 6, 10; * at 3, 8
    scores = torch.tensor([5.0, 1.0, 0.5, 9.0, 1.0, 0.2, 3.0, 0.4, 7.0, 0.3, 8.0])
    assert K.layers_to_drop(scores, pattern, 3) == [5, 9, 7]
    assert K.layers_to_drop(scores, pattern, 0) == []
    # ties -> lower id first
    assert K.layers_to_drop(torch.tensor([1.0, 0.0, 0.0, 1.0]), "MMMM", 3) == [1, 2, 0]
    # restricted to one type ('M' at 0, 2, 5, 7)
    assert K.layers_to_drop(scores, pattern, 2, only_type="M") == [5, 2]
    assert K.layers_to_drop(scores, pattern, 1, only_type="*") == [8]
    assert K.layers_to_drop(None, pattern, explicit=[4, 1]) == [4, 1]
    with pytest.raises(ValueError, match="valid alternative: 2"):
        K.layers_to_drop(scores, pattern, 3, only_type="*")
    with pytest.raises(ValueError, match="at least one layer"):
        K.layers_to_drop(scores, pattern, 11)
    with pytest.raises(ValueError, match="exactly one"):
        K.layers_to_drop(scores, pattern, 2, explicit=[1])
    with pytest.raises(ValueError, match="not of type"):
        K.layers_to_drop(None, pattern, explicit=[1], only_type="M")
    with pytest.raises(ValueError, match="out of range"):
        K.layers_to_drop(None, pattern, explicit=[11])
    with pytest.raises(ValueError, match="repeated"):
        K.layers_to_drop(None, pattern, explicit=[1, 1])
    with pytest.raises(ValueError, match="layer scores"):
        K.layers_to_drop(scores[:-1], pattern, 1)


def test_apply_depth_to_pattern():
    assert K.apply_depth_to_pattern("M-M*-M", [1, 3]) == "MM-M"
    assert K.apply_depth_to_pattern("M-M*-M", []) == "M-M*-M"
    assert K.apply_depth_to_pattern("M-M|*-M", [1, 3]) == "MM|-M"
    assert K.apply_depth_to_pattern("M-M|*-M", torch.tensor([5, 0])) == "-M|*-"
    nemotron = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    out = K.apply_depth_to_pattern(nemotron, [4, 0])
    assert len(out) == 50 and out == nemotron[1:4] + nemotron[5:]
    with pytest.raises(ValueError, match="out of range"):
        K.apply_depth_to_pattern("M-M", [3])
    with pytest.raises(ValueError, match="repeated"):
        K.apply_depth_to_pattern("M-M", [0, 0])
    with pytest.raises(ValueError, match="all 3 layers"):
        K.apply_depth_to_pattern("M-M", [0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        K.apply_depth_to_pattern("M-|M-", [2, 3])
