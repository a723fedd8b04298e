"""Make megatron-core run on a machine without CUDA (CPU, gloo).

Used only when CUDA is unavailable or the mamba_ssm / Transformer Engine kernels are
missing; on a GPU node with the kernels installed `install()` changes nothing.

megatron-core allocates with `device="cuda"` / `torch.cuda.current_device()` in many
places and calls `torch.cuda.synchronize()` in p2p code. Rather than patching the global
`torch` module (which would also change user code), we replace the name `torch` inside
the affected megatron modules with a proxy whose factory functions map a CUDA device to
the CPU and whose `torch.cuda` answers the few calls megatron makes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from typing import Any

import torch

_CUDA_MODULES = (
    # every megatron-core module (0.16 / 0.19) reached by model build, forward, training
    # step, optimizer and checkpointing that hard-codes a CUDA device
    "megatron.core.utils",
    "megatron.core.ssm.mamba_mixer",
    "megatron.core.ssm.mamba_block",
    "megatron.core.ssm.mamba_layer",
    "megatron.core.models.mamba.mamba_model",
    "megatron.core.models.hybrid.hybrid_model",
    "megatron.core.models.hybrid.hybrid_block",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    # mixture of experts (router, dispatcher, experts) and the pipeline-layout helpers
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.shared_experts",
)

_installed = False


def _to_cpu_device(dev: Any) -> Any:
    if isinstance(dev, int):
        return torch.device("cpu")
    if isinstance(dev, str) and dev.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


class _NullStream:
    """Stands in for torch.cuda.Stream: everything runs on the CPU's one 'stream'."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CudaNamespace(types.SimpleNamespace):
    """The subset of `torch.cuda` that megatron-core calls on its CPU-reachable paths."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def device_count():
        return 0

    Stream = _NullStream

    @staticmethod
    def stream(s=None):
        return _NullStream()

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def nvtx_range_push(*args, **kwargs):
        return None

    @staticmethod
    def nvtx_range_pop(*args, **kwargs):
        return None


class _CpuTorch(types.ModuleType):
    """Proxy for the `torch` module: functions get CUDA devices mapped to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.__dict__["cuda"] = _CudaNamespace()
        self.__dict__["_cache"] = {}

    def __getattr__(self, name):
        cache = self.__dict__["_cache"]
        if name in cache:
            return cache[name]
        attr = getattr(torch, name)
        # Only plain functions are wrapped: classes (Tensor, dtype, device, ...) and
        # submodules must stay themselves so isinstance checks keep working.
        if isinstance(attr, (types.BuiltinFunctionType, types.FunctionType)):
            attr = _map_device_kwarg(attr)
        elif name == "autocast":
            attr = _cpu_autocast
        cache[name] = attr
        return attr


def _map_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


def _cpu_autocast(device_type="cpu", *args, **kwargs):
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of megatron's clipper, which asserts `grad.type() == 'torch.cuda.FloatTensor'`."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def pos_emb_on_this_cp_rank(pos_emb, seq_dim: int, cp_group):
    """megatron's rope_utils.get_pos_emb_on_this_cp_rank (RoPE under context parallelism:
    chunks r and 2cp-1-r of the table) without its pinned-memory `.cuda()` index."""
    cp, r = cp_group.size(), cp_group.rank()
    idx = torch.tensor([r, 2 * cp - r - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


_TENSOR_TYPE = torch.Tensor.type


@contextlib.contextmanager
def cuda_type_names():
    """Within the block, `tensor.type()` (no argument) of a CPU tensor answers the CUDA
    name ('torch.BFloat16Tensor' -> 'torch.cuda.BFloat16Tensor'). megatron-core's
    mixed-precision and distributed optimizers sort parameters into fp32 / 16-bit groups
    by these names when they are built and refuse anything else; the rest of their code is
    device-agnostic once the `device='cuda'` allocations are mapped (install()). Scoped to
    optimizer construction; a no-op where CUDA exists."""
    if cuda_available():
        yield
        return

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and not self.is_cuda:
            name = _TENSOR_TYPE(self)
            return name.replace("torch.", "torch.cuda.", 1) if name.count(".") == 1 else name
        return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = _TENSOR_TYPE


def cuda_available() -> bool:
    return torch.cuda.is_available()


def install() -> bool:
    """Patch megatron-core modules for CPU execution. Idempotent. Returns True if patched."""
    global _installed
    if _installed:
        return True
    if cuda_available():
        return False
    proxy = _CpuTorch()
    for name in _CUDA_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue  # module belongs to another megatron-core release
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    rnd = sys.modules.get("megatron.core.tensor_parallel.random")
    if rnd is not None and hasattr(rnd, "_set_cuda_rng_state"):
        # activation recompute saves and replays the RNG states; the CPU generator is
        # handled by torch.get/set_rng_state beside these, so the "CUDA" one is a no-op
        rnd._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        rnd._set_cuda_rng_state = lambda *args, **kwargs: None
    opt = sys.modules.get("megatron.core.optimizer.optimizer")
    if opt is not None:
        opt.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    for name in ("megatron.core.models.common.embeddings.rotary_pos_embedding",
                 "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            mod.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank
    _installed = True
    return True
