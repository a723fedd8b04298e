"""What every ablation shares: a variant (a plan with one setting changed), the lab that
scores plans zero-shot from the teacher's tensors in memory and distills them for real, and
the results cache (results.json) keyed by the plans' keep sets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ParallelConfig
from ..plan.targets import TargetConfig

if TYPE_CHECKING:
    from .stage import AblationsConfig

DENSE = ("group", "source", "flap", "heads", "width_depth", "depth", "ffn", "cache")
MOE = ("experts", "expert_ffn")  # on the MoE teacher (AblationsConfig.moe)
ABLATIONS = DENSE + MOE


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    target: TargetConfig
    opts: dict = field(default_factory=dict)  # make_plan keyword settings
    plan: object = None

    @property
    def key(self) -> str:
        """The plan's keep sets (not its settings): equal keys prune identically."""
        d = self.plan.to_dict()
        blob = json.dumps({k: d[k] for k in ("target", "kept_layers", "hidden", "layers")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def planned(imp, name: str, target: TargetConfig, **opts) -> Variant:
    """A variant with its plan (make_plan with `opts`); a target the plan refuses names it."""
    from ..config import ConfigError
    from ..plan.targets import make_plan

    v = Variant(name, target, opts)
    try:
        v.plan = make_plan(imp, target, **opts)
    except ConfigError as e:
        raise ConfigError(f"ablation variant {name}: {e}") from None
    return v


def _target(base: TargetConfig | None = None, **kw) -> TargetConfig:
    return dataclasses.replace(base or TargetConfig(), **kw)


def _depth_drop(imp, pattern: str, metric: str, n: int) -> list[int]:
    from ..plan import keep as K

    return K.layers_to_drop(imp.depth[metric], pattern, n)


# ----------------------------------------------------------------------------- measuring


def _box(st) -> tuple:
    """A ShardedTensor's slice of its global tensor."""
    from ..compat import torch_dist

    return tuple(slice(o, o + n) for o, n in zip(st.global_offset, torch_dist.shard_data(st).shape))


def _global_tensors(tensors) -> dict:
    """key -> the full global tensor (a copy), assembled from one process's shards: at
    TP=EP=1 a key is either one shard or split along prepended axes (megatron's
    SequentialMLP: one [1, ...] chunk of the [experts, ...] tensor per local expert)."""
    from ..compat import torch_dist

    out = {}
    for st in tensors:
        if tuple(st.global_shape) == tuple(st.data.shape):
            out[st.key] = st.data.detach().clone()
            continue
        if st.key not in out:
            out[st.key] = torch.zeros(st.global_shape, dtype=st.data.dtype)
        out[st.key][_box(st)] = torch_dist.shard_data(st).detach()
    return out


class Lab:
    """Zero-shot scoring in one process group: the teacher's full tensors in memory."""

    def __init__(self, cfg: AblationsConfig, t_cfg, seq: int):
        from .. import dist as D
        from ..compat import mcore
        from ..model import build_model
        from ..train import checkpoint as ckpt
        from ..data.stage_data import datasets

        self.cfg, self.seq = cfg, seq
        self.par = D.init(ParallelConfig(tp=1, pp=1), seed=cfg.kd.seed)
        _, self.valid_ds, _ = datasets(cfg.data, seq, 1, cfg.eval_iters * cfg.micro_batch_size)
        teacher = build_model(dataclasses.replace(t_cfg, seq_length=seq), self.par, initialize=False)
        ckpt.load_model_weights(ckpt.require(cfg.teacher), teacher)
        self.source = _global_tensors(mcore.sharded_tensors(teacher))
        self.teacher_loss = self.loss(teacher)
        self.teacher_tps = self.throughput(teacher)
        del teacher

    def loss(self, model) -> float:
        from ..train.engine import evaluate, lm_forward_step, valid_batches

        return evaluate(model, valid_batches(self.valid_ds, self.cfg.micro_batch_size, self.cfg.eval_iters,
                                             self.par), lm_forward_step, self.cfg.eval_iters, self.par,
                        self.seq, self.cfg.micro_batch_size)

    @torch.no_grad()
    def throughput(self, model, repeats: int = 3) -> float:
        """Forward tokens/s on this machine, best of `repeats` timings."""
        from ..model import causal_mask

        b, s = self.cfg.micro_batch_size, self.seq
        tok = torch.randint(0, 1000, (b, s), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(s)[None].expand(b, -1)
        mask = causal_mask(s)
        model.eval()
        model(tok, pos, mask)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(self.cfg.throughput_iters):
                model(tok, pos, mask)
            best = min(best, time.perf_counter() - t0)
        return self.cfg.throughput_iters * b * s / best

    def pruned(self, plan):
        """The plan's pruned model, filled from the teacher's tensors by the prune rules."""
        from ..compat import mcore, torch_dist
        from ..model import build_model
        from ..rewrite import rules

        # every sharded tensor is filled below
        model = build_model(dataclasses.replace(plan.target, seq_length=self.seq), self.par,
                            initialize=False)
        rule = rules.Rules(plan)
        full: dict = {}  # pruned global tensors of keys split into shards (MoE: one per expert)
        with torch.no_grad():
            for st in mcore.sharded_tensors(model):
                src_key, idxs = rule(st.key)
                if tuple(st.global_shape) == tuple(st.data.shape):
                    rules.take(self.source[src_key], idxs, out=st.data)
                    continue
                if st.key not in full:
                    full[st.key] = rules.take(self.source[src_key], idxs)
                torch_dist.shard_data(st).copy_(full[st.key][_box(st)])
        return model

    def close(self) -> None:
        from .. import dist as D

        D.shutdown()


def _kd_one(cfg: AblationsConfig, v: Variant, seed: int, seq: int, workdir: Path, cache_k: int = 0,
            memo=None) -> dict:
    """prune + distill (seed = data order) + score on the fixed validation set; cache_k > 0:
    the teacher's top-K over the KD's tokens cached first (`teacher-logits`), the KD reads it."""
    from .. import dist as D
    from ..distill.stage import DistillConfig, run_distill
    from ..rewrite.stage import PruneConfig, run_prune
    from ..train import checkpoint as ckpt
    from ..train.pretrain import eval_checkpoint

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    v.plan.save(workdir / "plan.json")
    t0 = time.time()
    run_prune(PruneConfig(checkpoint=str(ckpt.require(cfg.teacher)), plan=str(workdir / "plan.json"),
                          output=str(workdir / "pruned"), keep_backup=False, overwrite=True, verify=False))
    train = dataclasses.replace(cfg.kd, seed=cfg.kd.seed + seed, eval_interval=cfg.kd.steps,
                                save_interval=cfg.kd.steps)
    data = dataclasses.replace(cfg.data, seed=cfg.data.seed + seed)
    cache, cache_rec = "", {}
    if cache_k:
        from ..distill.logits_stage import TeacherLogitsConfig, run_teacher_logits

        cache, t1 = str(workdir / "teacher_logits"), time.time()
        m = run_teacher_logits(TeacherLogitsConfig(
            teacher=str(ckpt.require(cfg.teacher)), output_dir=cache, data=data, seq_length=seq,
            samples=cfg.kd.steps * cfg.kd.global_batch_size, top_k=cache_k, temperature=cfg.kd_loss.temperature,
            micro_batch_size=cfg.kd.micro_batch_size, eval_iters=cfg.kd.eval_iters, resume=False))
        cache_rec = {"cache_seconds": time.time() - t1, "cache_bytes_per_token": m["bytes_per_token"]}
    d = run_distill(DistillConfig(student=str(workdir / "pruned"), teacher=str(ckpt.require(cfg.teacher)),
                                  output_dir=str(workdir / "distilled"), seq_length=seq, loss=cfg.kd_loss,
                                  data=data, train=train, resume=False, teacher_cache=cache),
                    teacher_memo=memo)
    par = D.init(ParallelConfig(tp=1, pp=1))
    try:
        loss = eval_checkpoint(workdir / "distilled", cfg.data, par, cfg.eval_iters, cfg.micro_batch_size)["loss"]
    finally:
        D.shutdown()
    if not cfg.keep_checkpoints:
        shutil.rmtree(workdir / "pruned", ignore_errors=True)
        shutil.rmtree(workdir / "distilled" / "checkpoints", ignore_errors=True)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    steps = sorted(cfg.kd.global_batch_size * seq / h["tokens_per_s"] for h in d.get("history") or [])
    return {"loss": loss, "seconds": time.time() - t0, "train_seconds": d["train_seconds"],
            # the median step: free of the first step's one-time compilation
            "step_seconds": steps[len(steps) // 2] if steps else None,
            "tokens": cfg.kd.steps * cfg.kd.global_batch_size * seq, **cache_rec,
            **({"teacher_memo": d["teacher_memo"]} if d.get("teacher_memo") else {})}


def kd_key(v: Variant, seed: int, cache_k: int = 0) -> str:
    return f"{v.key}/cache{cache_k}/s{seed}" if cache_k else f"{v.key}/s{seed}"


def run_kds(cfg: AblationsConfig, res: Results, want: list, seq: int, root: Path, label: str = "") -> None:
    """The short KD of each (variant, seed[, cache K]) of `want` without a result yet, each
    once, seed by seed (in order within a seed); every result is recorded as it finishes.
    The KDs of one seed read the same tokens from the same teacher: its logits are computed
    once and kept in memory (distill.teacher.TeacherMemo, up to cfg.teacher_memo_gb) for the
    seed's other KDs, which then equal a KD that runs the teacher bit for bit."""
    from ..distill.teacher import TeacherMemo

    todo, seen = [], set()
    for v, s, *k in want:
        key = kd_key(v, s, *k)
        if key not in res.d["kd"] and key not in seen:
            seen.add(key)
            todo.append((v, s, k[0] if k else 0, key))
    todo.sort(key=lambda t: t[1])  # stable: one seed's teacher logits in memory at a time
    memo = TeacherMemo(int(cfg.teacher_memo_gb * 2**30)) if cfg.teacher_memo_gb > 0 else None
    for i, (v, s, k, key) in enumerate(todo):
        if memo is not None and i and s != todo[i - 1][1]:
            memo.clear()
        how = f", teacher top-{k} cached" if k else ""
        print(f"[ablations] {label}KD {i + 1}/{len(todo)}: {v.name} seed {s} ({cfg.kd.steps} steps{how})", flush=True)
        rec = _kd_one(cfg, v, s, seq, root / key.replace("/", "-"), cache_k=k, memo=memo)
        rec["name"] = v.name
        res.put("kd", key, rec)
        print(f"[ablations] KD {v.name} seed {s}: loss {rec['loss']:.4f} ({rec['seconds']:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- state


class Results:
    """results.json: {"fingerprint", "zero_shot": {key: {...}}, "kd": {key/seed: {...}}}."""

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = path
        self.d = {"fingerprint": fingerprint, "zero_shot": {}, "kd": {}, "variants": {}}
        if resume and path.is_file():
            old = json.loads(path.read_text())
            if old.get("fingerprint") == fingerprint:
                self.d = old
            else:
                print(f"[ablations] {path} was made with other settings; starting over", flush=True)

    def put(self, section: str, key: str, rec: dict) -> None:
        self.d[section][key] = rec
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.d, indent=1))
        os.replace(tmp, self.path)


def _fingerprint(cfg: AblationsConfig) -> str:
    from ..train import checkpoint as ckpt

    d = {"teacher": str(ckpt.require(cfg.teacher).resolve()), "importance_mtime": os.path.getmtime(cfg.importance),
         "data": dataclasses.asdict(cfg.data), "seq": cfg.seq_length, "eval": [cfg.eval_iters, cfg.micro_batch_size],
         "kd": dataclasses.asdict(cfg.kd), "kd_loss": dataclasses.asdict(cfg.kd_loss)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
