"""`stats` stage: calibration forwards of a hybrid checkpoint -> importance file.

    python -m megatron_minitron stats -c configs/stats_default.yaml [key=value ...]
    torchrun --nproc_per_node N -m megatron_minitron stats -c ... parallel.tp=2

Calibration step k covers global samples [k*mbs*dp, (k+1)*mbs*dp) of the train split
(one epoch of the indexed dataset, never repeated); data-parallel rank r takes the r-th
`mbs` of them. The first `depth_samples` samples also get the skip-one-layer forwards
(depth KL, one extra forward per layer). Hooks accumulate (hooks.py), ranks reduce
(reduce.py), rank 0 scores (scores.py) and writes:
    <output_dir>/importance.pt (+ importance.json)   the importance file (io.py)
    <output_dir>/summary.json, layer_importance.png
    <output_dir>/partial/                             resumable partial state (removed at the end)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dist as D
from ..config import ConfigError, DataConfig, ModelConfig, ParallelConfig, check_ep_used, dump_json
from ..train import checkpoint as ckpt
from . import scores as S
from .hooks import MAMBA_SOURCES, SOURCES, StatsCollector, out_proj_col_sq
from .io import ImportanceFile

ALL_SOURCES = list(SOURCES) + ["kl"]
MAMBA_ONLY_SOURCES = MAMBA_SOURCES + ("flap",)  # what only Mamba layers have


@dataclass
class StatsConfig:
    checkpoint: str = "runs/default/teacher"
    # its shape for --dry-run / --print-config before that checkpoint exists: a model YAML
    # (configs/model/*.yaml), a recipe with a model: mapping, a plan.json (its target) or a
    # checkpoint; the checkpoint's own config wins once it exists
    checkpoint_model: str = ""
    output_dir: str = ""  # default: <checkpoint>/stats
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    samples: int = 256  # calibration samples (paper: 1024 x 8192 tokens)
    seq_length: int = 0  # 0 = the model's seq_length
    micro_batch_size: int = 4
    depth_samples: int = 32  # the first N samples also get the depth KL forwards (paper: 256)
    # depth KL logits are made this many tokens at a time (0 = the whole micro-batch at once):
    # peak extra memory about 5 x chunk x vocab/tp x 4 bytes instead of that per token
    depth_chunk_tokens: int = 1024
    # what to collect: Mamba x / z / y, flap, ffn (after the activation), ffn_pre (before it,
    # eq. 26), attn, hidden, cosine, kl (depth), moe (E layers: routed-expert scores, expert
    # FFN and shared-expert neurons)
    sources: list[str] = field(default_factory=lambda: list(ALL_SOURCES))
    save_interval: int = 16  # calibration steps between partial-state saves (0 = never)
    resume: bool = True  # continue from <output_dir>/partial when it matches this run
    stop_after: int = 0  # stop (leaving the partial state) after N steps of this run; 0 = run all
    # save the partial state and stop (exit 0) after this many minutes; 0 = no limit (the
    # stage also stops on SIGUSR1 / SIGTERM: preempt.py). Re-run the same command to resume.
    exit_duration_minutes: float = 0.0
    seed: int = 1234


def _out_dir(cfg: StatsConfig) -> Path:
    return Path(cfg.output_dir or Path(cfg.checkpoint) / "stats")


def validate(cfg: StatsConfig) -> ModelConfig:
    """Every user error, before any process group, model or forward."""
    validate_settings(cfg)
    path = ckpt.resolve(cfg.checkpoint)
    if path is None or not (path / ckpt.CONFIG_FILE).is_file():
        raise ConfigError(
            f"checkpoint={cfg.checkpoint!r} is not a megatron-minitron hybrid checkpoint (no "
            f"{ckpt.CONFIG_FILE}); train one with `pretrain`, import one with `import-hf`, or "
            "point checkpoint at a run directory / iteration folder")
    model_cfg = ckpt.read_model_config(path)
    validate_model(cfg, model_cfg)
    from ..data.stage_data import check_data

    check_data(cfg.data, model_cfg)
    from ..compat.torch_dist import check_files

    check_files(path)  # last (it reads the files): a missing / truncated shard or .metadata
    return model_cfg


def validate_settings(cfg: StatsConfig, world: int | None = None) -> None:
    """Settings errors, no file read (the run, --dry-run and --print-config); world: the
    number of processes (default $WORLD_SIZE)."""
    cfg.parallel.validate()
    cfg.data.validate()
    for key in ("samples", "micro_batch_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    for key in ("depth_samples", "save_interval", "stop_after", "seq_length", "depth_chunk_tokens"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")
    from ..preempt import check_minutes

    check_minutes(cfg.exit_duration_minutes)
    bad = [s for s in cfg.sources if s not in ALL_SOURCES]
    if bad:
        raise ConfigError(f"sources={cfg.sources}: unknown source(s) {bad}; choose from {ALL_SOURCES} "
                          "(Mamba: x = in_proj x part, z = in_proj z part, y = out_proj input)")
    if not cfg.sources:
        raise ConfigError(f"sources is empty; choose from {ALL_SOURCES}")
    if cfg.depth_samples > cfg.samples:
        raise ConfigError(f"depth_samples={cfg.depth_samples} exceeds samples={cfg.samples}; "
                          f"use depth_samples <= {cfg.samples}")
    _check_ep_steps(cfg, world)


def validate_model(cfg: StatsConfig, model_cfg: ModelConfig) -> None:
    """The checkpoint's model against the settings."""
    model_cfg.validate(cfg.parallel.tp, cfg.parallel.pp, prefix="checkpoint model", ep=cfg.parallel.ep)
    check_ep_used(cfg.parallel.ep, model_cfg)
    asked = [s for s in dict.fromkeys(cfg.sources) if s in MAMBA_ONLY_SOURCES]
    # no Mamba layer: the default list skips its Mamba sources (the run says so); a list of
    # the user's own naming one is refused
    if "M" not in model_cfg.pattern and asked and set(cfg.sources) != set(ALL_SOURCES):
        rest = [s for s in dict.fromkeys(cfg.sources) if s not in MAMBA_ONLY_SOURCES]
        raise ConfigError(
            f"sources={cfg.sources} names the Mamba source(s) {asked}, but the checkpoint's pattern "
            f"{model_cfg.pattern!r} has no Mamba (M) layer; remove them: sources=[{','.join(rest)}]")
    if "ffn_pre" in cfg.sources and model_cfg.activation == "swiglu":
        raise ConfigError("sources contains ffn_pre (FFN score before the activation), which is "
                          "undefined for a gated MLP (activation=swiglu); use ffn instead")


def _check_ep_steps(cfg: StatsConfig, world: int | None = None) -> None:
    """At parallel.ep > 1 an MoE layer's token exchange spans data-parallel ranks, so every
    rank must run the same forwards with the same batch shape: no rank may sit out a step
    (samples not filling the last one) or run depth-KL forwards the others skip (depth
    samples ending inside a step). Otherwise the collectives wait forever; refuse instead."""
    if cfg.parallel.ep <= 1:
        return
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    dp = max(1, world // (cfg.parallel.tp * cfg.parallel.pp))
    per = cfg.micro_batch_size * dp
    depth = cfg.depth_samples if "kl" in cfg.sources else 0
    for key, v in (("samples", cfg.samples), ("depth_samples", depth)):
        if v % per:
            lo, hi = v // per * per, -(-v // per) * per
            raise ConfigError(
                f"{key}={v} at parallel.ep={cfg.parallel.ep}: the experts' token exchange spans "
                f"the {dp} data-parallel ranks, so every step must give each rank a full "
                f"micro-batch (micro_batch_size={cfg.micro_batch_size} x dp={dp} = {per} samples "
                f"per step, depth samples included); use {key}="
                + (f"{lo} or {hi}" if lo else f"{hi}"))


def _fingerprint(cfg: StatsConfig, model_cfg: ModelConfig, seq: int, par) -> dict:
    return {"checkpoint": str(ckpt.require(cfg.checkpoint).resolve()), "model": model_cfg.to_dict(),
            "samples": cfg.samples, "seq_length": seq, "micro_batch_size": cfg.micro_batch_size,
            "depth_samples": cfg.depth_samples, "sources": sorted(cfg.sources),
            "data": {"prefix": cfg.data.prefix, "split": cfg.data.split, "seed": cfg.data.seed},
            "layout": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp}}


# ----------------------------------------------------------------------------- partial state


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_initialized() else 0


class PartialWriter:
    """Partial-state saves off the critical path. `save(K)` copies this rank's accumulators
    (a few MB) and a background thread writes partial/step_K/rank_R.pt; the loop goes on.
    The NEXT save point joins that thread (long done) and the ranks agree, with one tiny
    all-reduce (MIN of the last step every rank has written), which step is complete on all
    of them; rank 0 then points partial/latest at it (atomic rename) and removes older steps.
    A crash at any moment leaves `latest` at a step every rank finished writing.
    `save(K, sync=True)` (stop, stop_after) also waits and confirms K itself."""

    def __init__(self, out: Path, fp: dict, device):
        self.part = out / "partial"
        self.fp = fp
        self.device = device
        self.thread = None
        self.written = 0  # last step this rank finished writing
        self.confirmed = 0  # last step `latest` points at
        self.error = None

    def _write(self, step: int, state: dict) -> None:
        try:
            d = self.part / f"step_{step:07d}"
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f"rank_{_rank():05d}.pt.tmp"
            torch.save({"step": step, "fingerprint": self.fp, "acc": state}, tmp)
            tmp.replace(tmp.with_suffix(""))
            self.written = step
        except BaseException as e:  # re-raised in the main thread at the next join
            self.error = e

    def _join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error

    def _confirm(self) -> None:
        step = torch.tensor([self.written], dtype=torch.int64, device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
        step = int(step.item())
        if step > self.confirmed and D.is_rank0():
            t = self.part / "latest.tmp"
            t.write_text(f"step_{step:07d}")
            t.replace(self.part / "latest")
            for old in self.part.glob("step_*"):
                if int(old.name[5:]) < step:
                    shutil.rmtree(old, ignore_errors=True)
        self.confirmed = max(self.confirmed, step)

    def save(self, step: int, col: StatsCollector, sync: bool = False) -> None:
        """Collective (every rank, same steps)."""
        import threading

        self._join()
        self._confirm()
        self.thread = threading.Thread(target=self._write, args=(step, col.state_dict()),
                                       name=f"stats-partial-{step}", daemon=False)
        self.thread.start()
        if sync:
            self._join()
            self._confirm()

    def discard(self) -> None:
        """The run completed: wait for a pending write (the folder is removed next)."""
        self._join()


def _load_partial(out: Path, fp: dict, col: StatsCollector) -> int:
    """Restore this rank's accumulators; returns the number of steps already done (0 when
    there is no partial state)."""
    latest = out / "partial" / "latest"
    if not latest.is_file():
        return 0
    f = out / "partial" / latest.read_text().strip() / f"rank_{_rank():05d}.pt"
    if not f.is_file():
        raise ConfigError(f"partial state {f.parent} has no file for this rank; it was written "
                          f"with another layout: set resume=false or remove {out / 'partial'}")
    blob = torch.load(f, map_location="cpu", weights_only=False)
    if blob["fingerprint"] != fp:
        diff = sorted(k for k in fp if blob["fingerprint"].get(k) != fp[k])
        raise ConfigError(f"partial state in {out / 'partial'} was written by a different run "
                          f"(differs in {diff}); set resume=false or remove that folder")
    col.load_state_dict(blob["acc"])
    return int(blob["step"])


# ----------------------------------------------------------------------------- scoring


def build_importance(red: dict[str, torch.Tensor], model_cfg: ModelConfig, sources: list[str],
                     meta: dict) -> ImportanceFile:
    """Reduced accumulators (global, all layers) -> finalized scores (pure)."""
    pattern = model_cfg.pattern.replace("|", "")
    L, nh = len(pattern), model_cfg.mamba_num_heads
    layers: dict[int, dict] = {}
    readers = []
    for gid, kind in enumerate(pattern):
        p = f"L{gid}."
        entry: dict = {}
        if kind == "M":
            entry["mamba"] = {s: S.as_head_matrix(S.finalize(red[p + s]), nh)
                              for s in MAMBA_SOURCES if s in sources}
            if "flap" in sources:
                entry["flap"] = S.flap_column_scores_from_norms(
                    red[p + "flap_wcol"], red[p + "flap_n"], red[p + "flap_s1"], red[p + "flap_s2"])
        elif kind == "-":
            for src in ("ffn", "ffn_pre"):  # after / before the activation (hooks.py)
                if src in sources:
                    entry[src] = S.ffn_neuron_scores(S.finalize(red[p + src]))
        elif kind == "*" and "attn" in sources:
            entry["attn"] = S.attention_head_scores(S.finalize(red[p + "attn"]),
                                                    model_cfg.num_attention_heads)
        elif kind == "E" and "moe" in sources:
            try:
                entry["experts"] = S.expert_scores(red[p + "moe_mass"], red[p + "moe_freq"],
                                                   red[p + "moe_out"], red[p + "moe_seen"])
                copies = int(S.token_multiplicity(red[p + "moe_seen"], red[p + "moe_freq"]))
            except ValueError as e:
                raise RuntimeError(f"internal: layer {gid} expert statistics: {e}") from None
            # 1, or the TP size without sequence parallelism (the same in every layer)
            meta["moe_token_copies"] = max(meta.get("moe_token_copies", 1), copies)
            entry["expert_ffn"] = S.expert_ffn_scores(red[p + "moe_ffn"], red[p + "moe_seen"])
            if model_cfg.moe_shared_expert_intermediate_size:
                entry["shared_ffn"] = S.ffn_neuron_scores(S.finalize(red[p + "shared_ffn"]))
        if "hidden" in sources:
            readers.append(S.finalize(red[p + "hidden"]))
        layers[gid] = entry
    if "hidden" in sources:
        readers.append(S.finalize(red["final_norm"]))
        hidden = S.embedding_channel_scores(readers)
    else:
        hidden = torch.full((model_cfg.hidden_size,), float("nan"))
    nan = torch.full((L,), float("nan"))
    depth = {"kl": nan.clone(), "cosine": nan.clone()}
    if "kl" in sources and float(red.get("depth.kl_n", torch.zeros(()))) > 0:
        depth["kl"] = (red["depth.kl_sum"] / red["depth.kl_n"]).float()
    if "cosine" in sources:
        depth["cosine"] = torch.stack([red[f"L{g}.cos_sum"] / red[f"L{g}.cos_n"].clamp_min(1)
                                       for g in range(L)]).float()
    return ImportanceFile(model=model_cfg, layers=layers, hidden=hidden, depth=depth, meta=meta)


# ----------------------------------------------------------------------------- the stage


def run_stats(cfg: StatsConfig) -> dict:
    model_cfg = validate(cfg)
    from ..resources.check import check

    check("stats", cfg)  # per-GPU memory estimate vs parallel.memory_limit_gb
    seq = cfg.seq_length or model_cfg.seq_length
    started_here = not torch.distributed.is_initialized()
    t_start = time.time()
    par = D.init(cfg.parallel, seed=cfg.seed)
    try:
        return _run(cfg, model_cfg, seq, par, t_start)
    finally:
        if started_here:
            D.shutdown()


def _run(cfg: StatsConfig, model_cfg: ModelConfig, seq: int, par, t_start: float) -> dict:
    from ..model import build_model
    from ..train.engine import Progress, collate, fmt_eta
    from ..data.stage_data import datasets
    from .depth import accumulate_kl, hidden_out, pipeline_forward

    out = _out_dir(cfg)
    # one epoch of the train split (None = no repetition), so "too many samples" is visible
    train_ds, _, _ = datasets(cfg.data, seq, None, 1)
    if train_ds is None or len(train_ds) < cfg.samples:
        have = 0 if train_ds is None else len(train_ds)
        raise ConfigError(
            f"samples={cfg.samples} exceeds the {have} distinct train samples of length {seq} in "
            f"{cfg.data.prefix} (split {cfg.data.split!r}); use samples <= {have}, a shorter "
            "seq_length, or a larger corpus")
    from ..train.engine import runtime_for

    rt = runtime_for(cfg.parallel, training=False)  # sequence parallel; no fused Mamba path
    if "moe" in cfg.sources and model_cfg.is_moe and rt.moe_grouped_gemm:
        # the expert hooks read each local expert of megatron's SequentialMLP; grouped-GEMM
        # experts (TE, GPU) load the same checkpoint keys, so stats runs them sequentially
        D.print0("[stats] MoE experts run as SequentialMLP for the expert statistics "
                 "(parallel.moe_grouped_gemm ignored here)")
        rt = dataclasses.replace(rt, moe_grouped_gemm=False)
    model = build_model(model_cfg, par, initialize=False, runtime=rt)  # weights loaded next
    ckpt_dir = ckpt.require(cfg.checkpoint)  # the iteration folder actually loaded
    meta_ckpt = ckpt.load_model_weights(ckpt_dir, model)
    model.eval()

    offset = model_cfg.layer_offset(par.pp, par.pp_rank)
    n_local = len(model.decoder.layers)
    sources = list(dict.fromkeys(cfg.sources))
    if "M" not in model_cfg.pattern and set(sources) & set(MAMBA_ONLY_SOURCES):
        D.print0(f"[stats] pattern {model_cfg.pattern!r} has no Mamba layer: sources "
                 f"{', '.join(s for s in sources if s in MAMBA_ONLY_SOURCES)} skipped")
        sources = [s for s in sources if s not in MAMBA_ONLY_SOURCES]
    col = StatsCollector(model, model_cfg, par.tp, offset, [s for s in sources if s != "kl"],
                         device=par.device, sp_group=par.pg.tp if rt.sequence_parallel else None,
                         expt_tp_group=par.pg.expt_tp if model_cfg.is_moe else None)
    want_kl = "kl" in sources and cfg.depth_samples > 0
    L = model_cfg.num_layers
    if want_kl and par.is_last_stage:
        col.acc["depth.kl_sum"] = torch.zeros(L, dtype=torch.float64, device=par.device)
        col.acc["depth.kl_n"] = torch.zeros((), dtype=torch.float64, device=par.device)

    per_step = cfg.micro_batch_size * par.dp
    steps = math.ceil(cfg.samples / per_step)
    fp = _fingerprint(cfg, model_cfg, seq, par)
    if D.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    start = _load_partial(out, fp, col) if cfg.resume else 0
    if not cfg.resume and D.is_rank0():
        shutil.rmtree(out / "partial", ignore_errors=True)
    writer = PartialWriter(out, fp, par.device)
    writer.written = writer.confirmed = start
    D.print0(f"[stats] {model_cfg.pattern!r} from {ckpt.require(cfg.checkpoint)}: {cfg.samples} samples "
             f"x {seq} tokens ({cfg.depth_samples if want_kl else 0} with depth KL, {L} extra "
             f"forwards each); tp={par.tp} pp={par.pp} dp={par.dp}; {steps} steps of {per_step}"
             + (f"; resumed after step {start}" if start else ""))

    prog = Progress(steps, start, D.is_rank0(), "stats")
    end = steps if not cfg.stop_after else min(steps, start + cfg.stop_after)
    t_loop, c_loop, first_s = time.time(), time.process_time(), None
    from ..preempt import StopRequest, clear_record

    # lag=1: the stop flag's all-reduce overlaps the next step (no per-step wait between
    # DP ranks, which otherwise share no collective until the end)
    stop, interrupted = StopRequest(cfg.exit_duration_minutes, t_start, lag=1), None
    with torch.no_grad(), col, stop:
        for k in range(start, end):
            base = k * per_step + par.dp_rank * cfg.micro_batch_size
            idx = [i for i in range(base, base + cfg.micro_batch_size) if i < cfg.samples]
            if idx:  # ranks of one pipeline / TP group share dp_rank: they agree on this
                batch = collate([train_ds[i] for i in idx], par.device)
                held: list = []
                with hidden_out(model):
                    # no logits in the calibration pass: the last stage returns its final
                    # hidden states (kept for the depth KL, which makes logits in chunks)
                    pipeline_forward(model, batch, held.append if want_kl else (lambda _: None))
                col.count_samples(len(idx))
                m = sum(i < cfg.depth_samples for i in idx) if want_kl else 0
                if m:
                    sub = {k2: v[:m] for k2, v in batch.items()}
                    full = held[0][:m] if held else None
                    with col.paused():
                        accumulate_kl(model, sub, full, L, offset, n_local, par.is_last_stage,
                                      par.pg.tp, col.acc.get("depth.kl_sum"),
                                      chunk_tokens=cfg.depth_chunk_tokens)
                    if par.is_last_stage:
                        col.acc["depth.kl_n"] += m * seq
            prog.update(k + 1, {})
            if first_s is None:
                first_s = time.time() - t_loop  # warm-up step (allocations), kept apart
            if k + 1 < end and stop.poll():
                end = k + 1
                writer.save(end, col, sync=True)
                interrupted = stop.record(out, end, "partial state")
                break
            if cfg.save_interval and (k + 1) % cfg.save_interval == 0 and k + 1 < end:
                writer.save(k + 1, col)
            if (k + 1) % max(1, steps // 10) == 0:
                prog.write(f"[stats] step {k + 1}/{steps} ETA {fmt_eta(prog.eta(k + 1))}")
    prog.close()
    loop_s, loop_cpu = time.time() - t_loop, time.process_time() - c_loop
    if interrupted is not None:
        return {"stage": "stats", "complete": False, "steps_done": end, "steps": steps,
                "interrupted": interrupted}
    if end < steps:
        writer.save(end, col, sync=True)
        D.print0(f"[stats] stopped after step {end}/{steps} (stop_after={cfg.stop_after}); "
                 f"partial state in {out / 'partial'}; run again with resume=true to continue")
        return {"stage": "stats", "complete": False, "steps_done": end, "steps": steps}
    writer.discard()
    clear_record(out)

    from ..compat import mcore
    from .reduce import reduce_all

    weights = out_proj_col_sq(model, offset, col.kinds) if "flap" in sources else {}
    red = reduce_all(col.acc, par.pg.dp, par.pg.tp, par.pg.pp, weights, **par.expert_groups())
    done = int(round(float(red["samples"])))
    summary: dict = {"stage": "stats", "complete": True}
    if D.is_rank0():
        if done != cfg.samples:
            raise RuntimeError(f"internal: {done} samples accumulated, expected {cfg.samples}")
        meta = {
            "samples": done, "seq_length": seq,
            "depth_samples": cfg.depth_samples if want_kl else 0,
            "sources": sources, "checkpoint": str(ckpt_dir),
            "checkpoint_iteration": meta_ckpt.get("iteration"),
            "megatron_core": mcore.MCORE_VERSION,
            "layout": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp},
            "data": {"prefix": cfg.data.prefix, "split": cfg.data.split, "seed": cfg.data.seed},
            "aggregation": "mean |a| over sequence, L2 over samples (fp32); FLAP: ||W_out[:,j]||^2 "
                           "x unbiased Var(y_j) over tokens; depth: mean over tokens; routed "
                           "experts: out = sum over routed tokens of ||p * expert(x)||_2 (hidden "
                           "width), mass = sum of p, freq = assignments (p: routing weight after "
                           "top-k normalisation and scaling); expert_ffn = sqrt(mean over routed "
                           "tokens of (p * activation)^2); shared_ffn as ffn",
        }
        imp = build_importance(red, model_cfg, sources, meta)
        imp.save(out / "importance.pt")
        from .plot import plot_layer_importance

        plot = plot_layer_importance(imp.depth, model_cfg.pattern, out / "layer_importance.png",
                                     title=f"{model_cfg.pattern}  ({done} samples)")
        from .plot import plot_expert_importance

        expert_plot = plot_expert_importance(imp.layers, model_cfg.pattern, out / "expert_importance.png",
                                             score=DEFAULT_EXPERT_SCORE,
                                             title=f"routed experts  ({done} samples)")
        summary.update(_summary(imp, model_cfg, out, plot, loop_s, time.time() - t_start,
                                steps - start, per_step))
        if summary["experts"]:
            summary["expert_plot"] = str(expert_plot) if expert_plot else None
        # timing of this rank's loop: the first step (warm-up allocations) apart, and CPU time
        steady = steps - start - 1
        summary.update(collect_cpu_seconds_rank0=loop_cpu, first_step_seconds=first_s,
                       samples_per_second_steady=(steady * per_step / (loop_s - first_s))
                       if steady > 0 and first_s is not None and loop_s > first_s else None)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "config.json").write_text(dump_json(cfg))
        shutil.rmtree(out / "partial", ignore_errors=True)
        _print_summary(summary)
    D.barrier()
    return summary


def _summary(imp: ImportanceFile, model_cfg, out: Path, plot, loop_s, total_s, steps_run,
             per_step) -> dict:
    pattern = model_cfg.pattern.replace("|", "")
    kl = [float(v) for v in imp.depth["kl"]]
    cos = [float(v) for v in imp.depth["cosine"]]
    order = sorted(range(len(kl)), key=lambda i: kl[i]) if all(math.isfinite(v) for v in kl) else []
    return {
        "importance": str(out / "importance.pt"),
        "plot": str(plot) if plot else None,
        "samples": imp.meta["samples"],
        "depth_samples": imp.meta["depth_samples"],
        "seq_length": imp.meta["seq_length"],
        "layout": imp.meta["layout"],
        "collect_seconds": loop_s,
        "elapsed_seconds": total_s,
        "samples_per_second_this_run": steps_run * per_step / loop_s if loop_s > 0 else None,
        "layers": [{"layer": i, "type": pattern[i], "kl": kl[i], "cosine": cos[i]}
                   for i in range(len(pattern))],
        "least_important_by_kl": order,
        "experts": _expert_summary(imp, pattern),
    }


# the expert score a plan would rank by when not told otherwise (see README, "MoE importance"):
# `out` weighs how often an expert is chosen, with what weight, and how much its output
# moves the layer (the first-order change of the layer output if it were removed); `mass`
# ignores the output's size, `freq` also the routing weights
DEFAULT_EXPERT_SCORE = "out"


def _expert_summary(imp: ImportanceFile, pattern: str) -> list[dict]:
    """Per E layer with expert scores: the experts from least to most important by the
    default score, and each score's share of the layer total per expert (global order)."""
    rows = []
    for i, t in enumerate(pattern):
        ex = imp.layers.get(i, {}).get("experts")
        if t != "E" or not ex:
            continue
        s = ex[DEFAULT_EXPERT_SCORE].double()
        rows.append({
            "layer": i, "assignments": int(round(float(ex["freq"].double().sum()))),
            f"least_important_by_{DEFAULT_EXPERT_SCORE}": sorted(range(len(s)), key=lambda j: (float(s[j]), j)),
            **{f"{k}_share": [round(float(v), 6) for v in ex[k].double() / ex[k].double().sum().clamp_min(1e-30)]
               for k in ("out", "mass", "freq")},
        })
    return rows


def _print_summary(s: dict) -> None:
    D.print0(f"[stats] {s['samples']} samples ({s['depth_samples']} with depth KL) in "
             f"{s['collect_seconds']:.1f}s; wrote {s['importance']}")
    D.print0("[stats] layer type      KL(full||skip)   1-cos")
    for r in s["layers"]:
        D.print0(f"[stats] {r['layer']:5d}  {r['type']}   {r['kl']:14.6g}  {r['cosine']:9.4g}")
    if s["least_important_by_kl"]:
        D.print0(f"[stats] least important layers by KL: {s['least_important_by_kl']}")
    for r in s.get("experts", []):
        order = r[f"least_important_by_{DEFAULT_EXPERT_SCORE}"]
        f = r["freq_share"]
        D.print0(f"[stats] E layer {r['layer']}: {r['assignments']} token assignments, per-expert share "
                 f"{min(f):.3g}..{max(f):.3g}; least important by {DEFAULT_EXPERT_SCORE}: {order[:8]}"
                 + (" ..." if len(order) > 8 else ""))
    if s["plot"] is None:
        D.print0("[stats] (no plot: matplotlib is not installed)")
