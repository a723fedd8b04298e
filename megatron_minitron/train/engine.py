"""Training machinery on megatron-core pieces: DDP wrapper, megatron optimizer,
OptimizerParamScheduler, pipeline schedules (`get_forward_backward_func`), gradient
accumulation via micro-batches, checkpoint save/resume. Shared by pretrain and distill.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from ..dist import Parallel
from ..model import build_model, causal_mask
from . import checkpoint as ckpt
from . import cp as cpsplit


# ----------------------------------------------------------------------------- data


class MicroBatches:
    """Deterministic micro-batch stream for one rank.

    Global batch `step` holds samples [step*G, (step+1)*G). Micro-batch m of data-parallel
    rank r takes samples step*G + m*(mbs*dp) + r*mbs + [0, mbs). The position is a pure
    function of `step`, so resuming at step k continues exactly where a run would be.
    """

    def __init__(self, dataset, micro_batch_size: int, global_batch_size: int, dp: int,
                 dp_rank: int, start_step: int = 0, device="cpu", wrap: bool = True):
        self.ds = dataset
        self.mbs = micro_batch_size
        self.gbs = global_batch_size
        self.dp = dp
        self.dp_rank = dp_rank
        self.step = start_step
        self.m = 0
        self.device = device
        self.wrap = wrap
        self.num_micro = global_batch_size // (micro_batch_size * dp)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        base = self.step * self.gbs + self.m * self.mbs * self.dp + self.dp_rank * self.mbs
        idx = [base + i for i in range(self.mbs)]
        if not self.wrap and idx[-1] >= len(self.ds):
            raise StopIteration
        idx = [i % len(self.ds) for i in idx]
        samples = [self.ds[i] for i in idx]
        self.m += 1
        if self.m == self.num_micro:
            self.m = 0
            self.step += 1
        batch = collate(samples, self.device)
        batch["index"] = torch.tensor(idx, dtype=torch.long)  # dataset indices (a teacher cache's keys)
        return batch


def valid_batches(ds, micro_batch_size: int, eval_iters: int, par: Parallel) -> MicroBatches:
    """A fixed validation set: the first eval_iters x mbs x dp samples, the same at every
    evaluation and for every model evaluated on it."""
    return MicroBatches(ds, micro_batch_size, micro_batch_size * par.dp * eval_iters, par.dp,
                        par.dp_rank, start_step=0, device=par.device)


def collate(samples: list[dict], device="cpu") -> dict:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out


# ----------------------------------------------------------------------------- forward


def lm_forward_step(data_iterator: Iterator, model, use_mask: bool = True, cp_group=None):
    """forward_step_func for the pipeline schedules: LM cross-entropy on the last stage.
    cp_group (size > 1): the batch is split over its ranks (train/cp.py); no mask is passed
    (the CP attention masks its chunks itself)."""
    batch = next(data_iterator)
    if cp_group is not None and cp_group.size() > 1:
        batch = cpsplit.split_batch(batch, cp_group.size(), cp_group.rank())
        use_mask = False
    else:
        cp_group = None
    tokens = batch["tokens"]
    mask = causal_mask(tokens.shape[1], str(tokens.device)) if use_mask else None
    out = model(tokens, batch["position_ids"], mask, labels=batch["labels"])
    return out, partial(_lm_loss, batch["loss_mask"], cp_group=cp_group)


def forward_step_for(par: Parallel) -> Callable:
    """lm_forward_step for `par`'s layout (its CP group when cp > 1)."""
    if getattr(par, "cp", 1) > 1:
        return partial(lm_forward_step, cp_group=par.pg.cp)
    return lm_forward_step


def _lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor, cp_group=None):
    """Returns (sum loss, tokens, report): the schedule divides by tokens and micro-batches.
    Under CP the report holds this rank's own sums (each token counted once, where it is);
    the loss is divided by the micro-batch's token count over the CP group and multiplied
    by cp, since DDP averages gradients over dp x cp ranks."""
    per_token_loss = per_token_loss.float()
    total = (per_token_loss * loss_mask).sum()
    n = loss_mask.sum()
    report = {"lm loss": torch.stack([total.detach(), n.detach()])}
    return (*cp_scaled(total, n, cp_group), report)


def cp_scaled(total: torch.Tensor, n: torch.Tensor, cp_group=None):
    """(loss sum, tokens) for the schedule: as they are without CP (or cp = 1); under CP the
    sum x cp and the token count over the CP group, since DDP averages gradients over dp x cp
    ranks while each rank holds only its part of every sequence."""
    if cp_group is None or cp_group.size() == 1:
        return total, n.to(torch.int)
    n_all = n.detach().clone()
    dist.all_reduce(n_all, group=cp_group)
    return total * cp_group.size(), n_all.to(torch.int)


def reduce_reports(reports: list[dict], par: Parallel, key: str = "lm loss") -> float:
    """Token-weighted mean of `key` over micro-batches and data-parallel ranks, on every
    rank. Only the last pipeline stage's TP-rank-0 replicas contribute (each DP replica's
    report is counted once)."""
    acc = torch.zeros(2, dtype=torch.float64)
    if par.is_last_stage and par.tp_rank == 0:
        for r in reports:
            acc += r[key].double().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        acc = acc.to(par.device)
        dist.all_reduce(acc)
        acc = acc.cpu()
    return (acc[0] / acc[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------- setup


def use_distributed_optimizer(parallel: ParallelConfig) -> bool:
    """Megatron's distributed optimizer (fp32 main params and Adam state sharded over DP):
    the default on GPU; on CPU on request (`true`). "auto" keeps the plain optimizer on CPU,
    where sharding buys nothing and the tiny test models train the same either way."""
    if parallel.distributed_optimizer == "auto":
        return torch.cuda.is_available()
    return parallel.distributed_optimizer == "true"


def runtime_for(parallel: ParallelConfig, train: Optional[TrainConfig] = None,
                training: bool = True):
    """The model Runtime a stage's settings ask for; GPU-only settings refused on CPU
    (before any model is built)."""
    from ..compat import mcore
    from ..model import Runtime

    cuda = torch.cuda.is_available()
    kernels = cuda and mcore.HAVE_MAMBA_SSM
    mem_eff = parallel.mamba_mem_eff_path
    if mem_eff == "true" and not kernels:
        raise ConfigError("parallel.mamba_mem_eff_path=true needs CUDA and mamba_ssm's fused "
                          "kernel; use parallel.mamba_mem_eff_path=auto or false here")
    if mem_eff == "true" and not training:
        raise ConfigError("parallel.mamba_mem_eff_path=true: the stats hooks read the unfused "
                          "in_proj / out_proj tensors; use auto or false for this stage")
    if parallel.fp8 and not mcore.te_usable():
        raise ConfigError(f"parallel.fp8={parallel.fp8} needs Transformer Engine on a GPU; "
                          "use parallel.fp8='' here")
    for key in ("overlap_grad_reduce", "overlap_param_gather"):
        if getattr(parallel, key) and not cuda:
            raise ConfigError(f"parallel.{key}=true overlaps NCCL communication with compute "
                              f"on GPU; set parallel.{key}=false on CPU")
    if parallel.overlap_param_gather and not use_distributed_optimizer(parallel):
        raise ConfigError("parallel.overlap_param_gather=true needs the distributed optimizer "
                          "(parallel.distributed_optimizer=auto or true)")
    dispatcher = parallel.moe_dispatcher
    if dispatcher == "auto":
        dispatcher = "alltoall" if cuda else "allgather"
    if dispatcher != "allgather" and not cuda:
        raise ConfigError(f"parallel.moe_dispatcher={dispatcher} runs on GPU only (megatron's "
                          "alltoall dispatcher records CUDA stream events, flex needs DeepEP); "
                          "use parallel.moe_dispatcher=auto or allgather on CPU")
    if dispatcher == "flex" and importlib.util.find_spec("deep_ep") is None:
        raise ConfigError("parallel.moe_dispatcher=flex needs DeepEP (deep_ep), which is not "
                          "installed; use parallel.moe_dispatcher=alltoall")
    grouped = parallel.moe_grouped_gemm
    if grouped == "true" and not mcore.te_usable():
        raise ConfigError("parallel.moe_grouped_gemm=true needs Transformer Engine on a GPU "
                          "(TEGroupedMLP); use parallel.moe_grouped_gemm=auto or false here")
    fit = train is not None and training
    return Runtime(
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        recompute=train.recompute if fit else "none",
        mamba_mem_eff_path=training and kernels and mem_eff in ("auto", "true"),
        fp8=parallel.fp8,
        ep=parallel.ep,
        moe_dispatcher=dispatcher,
        moe_grouped_gemm=grouped == "true" or (grouped == "auto" and mcore.te_usable()),
        # the router learns only where the model trains (not in stats, eval, a KD teacher)
        moe_aux_loss_coeff=train.moe_aux_loss_coeff if fit else 0.0,
        moe_bias_update_rate=train.moe_router_bias_update_rate if fit else 0.0,
    )


def wrap_ddp(model, parallel: ParallelConfig):
    from ..compat import mcore

    ddp_cfg = mcore.DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer(parallel),
        check_for_nan_in_grad=False,
    )
    return mcore.DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def build_optimizer(ddp_model, train: TrainConfig, parallel: ParallelConfig):
    from ..compat import mcore

    tcfg = ddp_model.module.config
    opt_cfg = mcore.OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        clip_grad=train.clip_grad,
        bf16=tcfg.bf16,
        params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer(parallel),
    )
    from ..compat import cpu

    with cpu.cuda_type_names():  # megatron sorts params by 'torch.cuda.*' names (CPU runs)
        optimizer = mcore.get_megatron_optimizer(opt_cfg, [ddp_model])
    scheduler = mcore.OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=train.steps,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.steps,
        wd_incr_style="constant",
    )
    tcfg.finalize_model_grads_func = mcore.finalize_model_grads
    tcfg.no_sync_func = ddp_model.no_sync
    tcfg.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


@dataclass
class Trainable:
    model_cfg: ModelConfig
    par: Parallel
    model: object  # DDP-wrapped megatron model (this rank's stage)
    optimizer: object
    scheduler: object
    iteration: int = 0
    distributed_optimizer: bool = False
    optimizer_checkpoint: str = "dp_sharded"  # ParallelConfig.optimizer_checkpoint


def build_trainable(model_cfg: ModelConfig, par: Parallel, train: TrainConfig,
                    parallel: ParallelConfig, initialize: bool = True) -> Trainable:
    """initialize=False: no random init (a checkpoint load follows)."""
    model = build_model(model_cfg, par, initialize=initialize,
                        runtime=runtime_for(parallel, train))
    ddp = wrap_ddp(model, parallel)
    opt, sched = build_optimizer(ddp, train, parallel)
    return Trainable(model_cfg, par, ddp, opt, sched,
                     distributed_optimizer=use_distributed_optimizer(parallel),
                     optimizer_checkpoint=parallel.optimizer_checkpoint)


# How the distributed optimizer's state is written (megatron's sharding types):
# "dp_sharded": each DP rank writes its own slice of the flat buffers (no gather; loads
# only at the same TP/PP/DP layout); "reshardable": gathered on DP rank 0 (through the
# gloo DP group, in host memory) and stored per parameter, loadable at any layout.
OPTIM_SHARDING = {"dp_sharded": "dp_reshardable", "reshardable": "fully_reshardable"}


def sharded_state(t: Trainable, is_loading: bool = False, fmt: str = "dp_sharded") -> dict:
    model_sd = t.model.module.sharded_state_dict()
    if is_loading and t.distributed_optimizer:
        from ..compat import mcore

        mcore.init_distributed_optimizer_state(t.optimizer)
    return {
        "model": model_sd,
        # (the plain optimizer ignores the metadata: it stores state per parameter)
        "optimizer": t.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": OPTIM_SHARDING[fmt],
                      "distrib_optim_fully_reshardable_mem_efficient": True}),
    }


def save_trainable(t: Trainable, run_dir, extra_meta: Optional[dict] = None) -> None:
    sd = sharded_state(t, fmt=t.optimizer_checkpoint)
    # plain (non-sharded) values are stored once, in the checkpoint's common state
    sd["scheduler"] = t.scheduler.state_dict()
    sd["iteration"] = t.iteration
    meta = {"tp": t.par.tp, "pp": t.par.pp, "ep": t.par.ep, "dp": t.par.dp, "cp": t.par.cp,
            "optimizer": {"distributed": t.distributed_optimizer,
                          "format": t.optimizer_checkpoint if t.distributed_optimizer else "plain"},
            **(extra_meta or {})}
    ckpt.save(run_dir, t.iteration, t.model_cfg, sd, meta)


def load_weights(t: Trainable, path) -> dict:
    """Model weights only (fresh optimizer): the load, then the optimizer's fp32 main params
    refreshed from them (a bf16 model's main params were copied at optimizer build)."""
    meta = ckpt.load_model_weights(path, t.model)
    t.optimizer.reload_model_params()
    return meta


def _saved_optimizer(meta: dict) -> tuple[bool, str]:
    # checkpoints from before the key: the plain optimizer, or a reshardable distributed one
    opt = meta.get("optimizer") or {}
    dist_opt = bool(opt.get("distributed", False))
    return dist_opt, opt.get("format", "reshardable" if dist_opt else "plain")


def resume_trainable(t: Trainable, path) -> dict:
    """Load model, optimizer, scheduler and iteration. A distributed optimizer saved sharded
    by DP loads only at its own layout; at another layout this names the one-off fix."""
    meta = ckpt.read_meta(path)
    saved_dist, fmt = _saved_optimizer(meta)
    where = ckpt.require(path)
    if saved_dist != t.distributed_optimizer:
        raise ConfigError(
            f"{where} holds {'distributed' if saved_dist else 'plain'}-optimizer state; resume "
            f"with parallel.distributed_optimizer={'true' if saved_dist else 'false'}, or start "
            "from its weights only with init_from=<this checkpoint> and resume=false")
    # (the distributed optimizer shards over the dp x cp ranks: cp is part of the layout)
    saved = {k: meta.get(k, 1 if k in ("ep", "cp") else None) for k in ("tp", "pp", "ep", "dp", "cp")}
    now = {"tp": t.par.tp, "pp": t.par.pp, "ep": t.par.ep, "dp": t.par.dp, "cp": t.par.cp}
    if saved_dist and fmt == "dp_sharded" and saved != now:
        lay = " ".join(f"{k}={v}" for k, v in saved.items())
        raise ConfigError(
            f"{where} stores the distributed optimizer's state sharded by data-parallel rank "
            f"at {lay}, not loadable at " + " ".join(f"{k}={v}" for k, v in now.items()) + ". Reshard "
            f"it once: rerun at {lay} with parallel.optimizer_checkpoint=reshardable (it "
            "rewrites the checkpoint on resume), then resume at the new layout")
    from ..compat import mcore

    sd = sharded_state(t, is_loading=True, fmt=fmt if saved_dist else "dp_sharded")
    sd["scheduler"] = None
    sd["iteration"] = None
    state = ckpt.load(path, sd)
    t.model.module.load_state_dict(state["model"], strict=True)
    mcore.load_optimizer_state(t.optimizer, state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.iteration = int(state["iteration"])
    if saved_dist and fmt != t.optimizer_checkpoint:
        # rewrite in the requested format now (dp_sharded -> reshardable before a layout change)
        save_trainable(t, where.parent.parent, {k: v for k, v in meta.items()
                                                if k not in ("tp", "pp", "ep", "dp", "cp", "optimizer",
                                                             "iteration", "megatron_core")})
    return meta


# ----------------------------------------------------------------------------- steps


def train_step(t: Trainable, data: Iterator, forward_step: Callable, num_micro: int,
               seq_length: int, micro_batch_size: int,
               schedule_kwargs: Optional[dict] = None) -> dict:
    """One optimizer step over `num_micro` micro-batches (gradient accumulation).
    `schedule_kwargs` go to the pipeline schedule as is (e.g. adjust_tensor_shapes_fn)."""
    from ..compat import mcore

    t.model.train()
    t.model.zero_grad_buffer()
    t.optimizer.zero_grad()
    fb = mcore.get_forward_backward_func()
    reports = fb(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[t.model],
        num_microbatches=num_micro,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
        **(schedule_kwargs or {}),
    )
    ok, grad_norm, _ = t.optimizer.step()
    t.scheduler.step(increment=1)
    t.iteration += 1
    return {
        "reports": reports,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": t.optimizer.param_groups[0]["lr"],
        "skipped": not ok,
    }


@torch.no_grad()
def evaluate(model, data: Iterator, forward_step: Callable, num_micro: int, par: Parallel,
             seq_length: int, micro_batch_size: int, key: str = "lm loss") -> float:
    """Forward-only pass over `num_micro` micro-batches; the token-weighted mean of `key`."""
    from ..compat import mcore

    model.eval()
    fb = mcore.get_forward_backward_func()
    reports = fb(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[model],
        num_microbatches=num_micro,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    return reduce_reports(reports, par, key)


class Progress:
    """Rank-0 console progress: a tqdm bar when attached to a terminal, log lines always."""

    def __init__(self, total: int, start: int, enabled: bool, desc: str):
        self.enabled = enabled
        self.t0 = time.time()
        self.start = start
        self.total = total
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
                            disable=None)  # disabled automatically when not a TTY

    def update(self, it: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in postfix.items()}, refresh=False)

    def eta(self, it: int) -> float:
        done = it - self.start
        if done <= 0:
            return float("nan")
        return (time.time() - self.t0) / done * (self.total - it)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
