"""TP parity worker for megatron_minitron.distill.loss (launched by torchrun, gloo backend).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/kd_loss_worker.py OUT.json

Every rank builds the same seeded full-vocab logits [s, b, V], keeps its contiguous vocab
slice (rank r: [r*V/tp, (r+1)*V/tp)), and computes kd_loss + grad with the vocab sharded over
a TP group (the world group and a new_group). The reference is the same function on the full
logits with tp_group=None (itself unit-tested against F.kl_div / F.cross_entropy) plus the
plain-autograd twins. Also checks our explicit-group CE against megatron's
``tensor_parallel.vocab_parallel_cross_entropy`` under a real TP=world parallel_state.
Rank 0 writes max abs errors as JSON to argv[1]; exits 1 on any mismatch.
"""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_minitron.distill.loss import (  # noqa: E402
    cross_entropy_reference,
    forward_kl_reference,
    kd_loss,
    vocab_parallel_cross_entropy,
    vocab_parallel_forward_kl,
)

# Max abs error tolerances, per dtype: (loss, grad). The pytest wrapper asserts the same.
TOL = {"float64": (1e-10, 1e-12), "float32": (1e-5, 1e-6)}
S, B, V_LOCAL = 9, 2, 37  # odd sizes: chunks do not divide the 18 tokens evenly


def _full_inputs(dtype, world, seed):
    g = torch.Generator().manual_seed(seed)
    v = V_LOCAL * world
    s = (torch.randn(S, B, v, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = (torch.randn(S, B, v, generator=g, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, v, (B, S), generator=g)  # [b, s]
    mask = (torch.rand(B, S, generator=g) > 0.25).float()  # [b, s]
    return s, t, labels, mask


def _max_across(x: float, group=None) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def _spread_across(x: torch.Tensor) -> float:
    """max |x_rank - x_rank0| over ranks: results must be identical on every TP rank."""
    ref = x.detach().to(torch.float64).clone()
    dist.broadcast(ref, src=0)
    return _max_across((x.detach().to(torch.float64) - ref).abs().max().item())


def run_cases(rank, world):
    groups = {"world": dist.group.WORLD, "new_group": dist.new_group(ranks=list(range(world)))}
    sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    results = {}
    seed = 0
    for dtype_name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        for group_name, group in groups.items():
            for chunk in (None, 4):
                for temperature, alpha in ((1.0, 1.0), (2.0, 0.5), (0.7, 0.0)):
                    seed += 1
                    s, t, labels, mask = _full_inputs(dtype, world, seed)
                    kw = dict(temperature=temperature, alpha_kd=alpha, chunk_size=chunk)

                    # Sharded: each rank holds its vocab slice.
                    s_loc = s[..., sl].clone().requires_grad_(True)
                    loss, logs = kd_loss(s_loc, t[..., sl], labels, mask, tp_group=group, **kw)
                    loss.backward()

                    # Reference: the world-size-1 path on the full vocabulary.
                    s_ref = s.clone().requires_grad_(True)
                    loss_ref, logs_ref = kd_loss(s_ref, t, labels, mask, tp_group=None, **kw)
                    loss_ref.backward()

                    # Plain-autograd twin for the mixed loss (independent of our Functions).
                    s_twin = s.clone().requires_grad_(True)
                    m = mask.t()
                    twin = torch.zeros((), dtype=dtype)
                    if alpha > 0:
                        twin = twin + alpha * (forward_kl_reference(s_twin, t, temperature) * m).sum()
                    if alpha < 1:
                        ce = cross_entropy_reference(s_twin, labels.t())
                        twin = twin + (1 - alpha) * (ce * m).sum()
                    twin = twin / m.sum()
                    twin.backward()

                    # Per-token KL on its own (no masking / mixing).
                    if alpha > 0:
                        kl = vocab_parallel_forward_kl(
                            s[..., sl], t[..., sl], temperature, tp_group=group, chunk_size=chunk
                        )
                        kl_err = (kl - forward_kl_reference(s, t, temperature)).abs().max().item()
                    else:
                        kl_err = 0.0

                    case = f"{dtype_name}/{group_name}/chunk={chunk}/T={temperature}/alpha={alpha}"
                    results[case] = {
                        "dtype": dtype_name,
                        "loss_err": _max_across(abs(loss.item() - loss_ref.item())),
                        "loss_err_twin": _max_across(abs(loss.item() - twin.item())),
                        "grad_err": _max_across(
                            (s_loc.grad - s_ref.grad[..., sl]).abs().max().item()
                        ),
                        "grad_err_twin": _max_across(
                            (s_loc.grad - s_twin.grad[..., sl]).abs().max().item()
                        ),
                        "per_token_kl_err": _max_across(kl_err),
                        "loss_rank_spread": _spread_across(loss),
                        "logs_err": _max_across(
                            max(abs(logs[k].item() - logs_ref[k].item()) for k in logs)
                        ),
                    }
    return results


def topk_cases(rank, world):
    """Cached top-K KD (distill/topk.py) with the vocabulary sharded: the teacher's top-K
    (ids equal, log-probs / rest mass) and the KL_K loss + gradient vs the world-size-1 path
    on the full logits (itself checked against a brute-force twin in tests/unit/test_topk_loss.py)."""
    from megatron_minitron.distill.topk import teacher_topk, topk_kd_loss

    sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    out, seed = {}, 100
    for dtype_name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        for k in (1, 8, V_LOCAL + 3, V_LOCAL * world):  # one rank's share, more, all
            for temperature, chunk, alpha in ((1.0, None, 1.0), (2.0, 4, 0.5)):
                seed += 1
                s, t, labels, mask = _full_inputs(dtype, world, seed)
                ids, lps, rest = teacher_topk(t[..., sl], k, temperature, dist.group.WORLD, chunk)
                rids, rlps, rrest = teacher_topk(t, k, temperature, None, chunk)
                kw = dict(labels=labels, loss_mask=mask, temperature=temperature, alpha_kd=alpha,
                          chunk_size=chunk)
                a = s[..., sl].clone().requires_grad_(True)
                loss, _ = topk_kd_loss(a, ids, lps, rest, tp_group=dist.group.WORLD, **kw)
                loss.backward()
                b = s.clone().requires_grad_(True)
                ref, _ = topk_kd_loss(b, rids, rlps, rrest, tp_group=None, **kw)
                ref.backward()
                fin = torch.isfinite(rrest)
                out[f"topk/{dtype_name}/k={k}/T={temperature}/chunk={chunk}/alpha={alpha}"] = {
                    "dtype": dtype_name,
                    "ids_differ": _max_across(float((ids != rids).sum())),
                    "loss_err": _max_across(abs(loss.item() - ref.item())),
                    "logprob_err": _max_across((lps - rlps).abs().max().item()),
                    "rest_err": _max_across(((rest - rrest).abs()[fin].max().item() if fin.any() else 0.0)
                                            + float((torch.isinf(rest) != ~fin).sum())),
                    "grad_err": _max_across((a.grad - b.grad[..., sl]).abs().max().item()),
                    "loss_rank_spread": _spread_across(loss),
                }
    return out


def megatron_ce_parity(rank, world):
    """Our explicit-group CE vs megatron's global-state CE, both at TP=world."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
        s, _, labels, _ = _full_inputs(torch.float32, world, 1234)
        target = labels.t().contiguous()  # [s, b]
        w = torch.randn(S, B, generator=torch.Generator().manual_seed(7))

        ours_in = s[..., sl].clone().requires_grad_(True)
        ours = vocab_parallel_cross_entropy(ours_in, target, tp_group=group, chunk_size=5)
        (ours * w).sum().backward()

        # megatron's CE works in place on fp32 logits: give it its own copy.
        meg_in = s[..., sl].clone().requires_grad_(True)
        meg = tensor_parallel.vocab_parallel_cross_entropy(meg_in.clone(), target)
        (meg * w).sum().backward()
        return {
            "dtype": "float32",
            "loss_err": _max_across((ours - meg).abs().max().item()),
            "grad_err": _max_across((ours_in.grad - meg_in.grad).abs().max().item()),
        }
    finally:
        parallel_state.destroy_model_parallel()


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ok = True
    payload = {"world_size": world, "tolerances": TOL}
    try:
        payload["cases"] = run_cases(rank, world)
        payload["megatron_ce"] = megatron_ce_parity(rank, world)
        payload["cases"].update(topk_cases(rank, world))
        failures = []
        for name, r in list(payload["cases"].items()) + [("megatron_ce", payload["megatron_ce"])]:
            tol_loss, tol_grad = TOL[r["dtype"]]
            for key, val in r.items():
                if key == "dtype":
                    continue
                tol = tol_grad if key.startswith("grad") else tol_loss
                if key in ("loss_rank_spread", "ids_differ"):
                    tol = 0.0  # bitwise identical on every rank / the same top-K ids
                if not val <= tol:
                    failures.append(f"{name}: {key}={val:.3e} > {tol:.0e}")
        payload["failures"] = failures
        ok = not failures
    except Exception:  # report, then fail the launch
        payload["error"] = traceback.format_exc()
        ok = False
        print(payload["error"], file=sys.stderr, flush=True)
    if rank == 0:
        summary = {}
        for r in payload.get("cases", {}).values():
            d = summary.setdefault(r["dtype"], {})
            for key, val in r.items():
                if key != "dtype":
                    d[key] = max(d.get(key, 0.0), val)
        payload["max_by_dtype"] = summary
        with open(out_path, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        for line in payload.get("failures", []):
            print("MISMATCH", line, flush=True)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
