"""Process groups and rank-0 helpers. Parallel state is created here and then passed on
explicitly (a `Parallel` object holding the groups); algorithm code never reads
megatron's global parallel state.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import ConfigError, ParallelConfig


@dataclass
class Parallel:
    """The process groups of one rank, plus its coordinates in the (tp, pp, dp) grid."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    pg: Any  # megatron ProcessGroupCollection (tp, pp, dp, cp, mp, ep, expt_dp, ...)
    device: torch.device
    ep: int = 1  # expert parallel: MoE experts split over ep ranks of the DP group
    ep_rank: int = 0
    cp: int = 1  # context parallel: each sequence split over the cp ranks of pg.cp
    cp_rank: int = 0

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def expert_groups(self) -> dict:
        """The groups an MoE layer's experts are laid out on (megatron's expert grid, tp x ep
        x expt_dp x pp): `ep_group` (ranks holding the other blocks of experts, the same
        expert-TP rank), `expt_dp_group` (ranks holding the same experts that see other
        tokens: the data-parallel group of expert weights, DP / ep wide, not the dense DP
        group), `expt_tp_group` (the experts' TP slices; = the TP group here, megatron's
        default expert_tensor_parallel_size)."""
        return {"ep_group": self.pg.ep, "expt_dp_group": self.pg.expt_dp,
                "expt_tp_group": self.pg.expt_tp}


def initialized() -> bool:
    """Whether torch.distributed is up (a stage that finds it up leaves it up)."""
    return dist.is_initialized()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def init(parallel: ParallelConfig, seed: int = 1234) -> Parallel:
    """Start torch.distributed (torchrun env, or a world of one) and megatron's groups."""
    from .compat import mcore, setup_runtime

    setup_runtime()
    cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA; use parallel.backend=gloo on CPU")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    world = dist.get_world_size()
    check_world(parallel, world)
    mp = parallel.tp * parallel.pp * parallel.cp
    mcore.parallel_state.destroy_model_parallel()
    mcore.parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep, context_parallel_size=parallel.cp,
    )
    set_seed(seed)
    ps = mcore.parallel_state
    pg = mcore.ProcessGroupCollection.use_mpu_process_groups()
    return Parallel(
        tp=parallel.tp,
        pp=parallel.pp,
        dp=world // mp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        pg=pg,
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        ep=parallel.ep,
        ep_rank=ps.get_expert_model_parallel_rank(),
        cp=parallel.cp,
        cp_rank=ps.get_context_parallel_rank(),
    )


def check_world(parallel: ParallelConfig, world: int) -> None:
    """The layout fits `world` processes: tp x pp x cp divides it, and the data-parallel
    size is a multiple of ep (megatron's expert-parallel ranks are drawn from the DP group)."""
    cp = getattr(parallel, "cp", 1)
    mp = parallel.tp * parallel.pp * cp
    what = "parallel.tp x parallel.pp" + (" x parallel.cp" if cp > 1 else "")
    if world % mp:
        raise ConfigError(
            f"world size {world} is not divisible by {what} = {mp}; "
            f"launch a multiple of {mp} processes or change the layout"
        )
    dp = world // mp
    if dp % parallel.ep:
        ok = [e for e in range(1, dp + 1) if dp % e == 0]
        raise ConfigError(
            f"parallel.ep={parallel.ep} does not divide the data-parallel size {dp} (world {world} "
            f"/ {what.replace('parallel.', '')} = {mp}); choose parallel.ep in {ok}, or launch "
            f"{mp * parallel.ep * max(1, -(-dp // parallel.ep))} processes")


def set_seed(seed: int) -> None:
    from .compat import mcore

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mcore.model_parallel_cuda_manual_seed(seed)
    else:
        # The CUDA RNG tracker asserts CUDA; in inference mode it is a no-op tracker
        # (dropout must then stay 0 on CPU, which our configs do).
        mcore.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


def shutdown() -> None:
    from .compat import mcore

    if dist.is_initialized():
        mcore.parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(t: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
