"""Distributed checkpoints (megatron `dist_checkpointing`, torch_dist format) that carry
their model config, so loading needs no size flags.

Layout of a run directory:
    <run>/checkpoints/iter_0000100/   megatron sharded checkpoint + model_config.json + meta.json
    <run>/checkpoints/latest          text: the name of the newest complete iteration folder
A checkpoint is written to `iter_XXXXXXX.partial`, renamed when every rank has finished,
and only then is `latest` replaced (atomically): a crash never leaves `latest` pointing at
a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from ..config import ConfigError, ModelConfig, build
from ..dist import barrier, is_rank0

CONFIG_FILE = "model_config.json"
META_FILE = "meta.json"


def iteration_dir(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter_{iteration:07d}"


def resolve(path: str | Path) -> Optional[Path]:
    """A run dir, a checkpoints dir or an iteration dir -> the iteration dir (or None)."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file() and (p / META_FILE).is_file():
        return p
    for base in (p / "checkpoints", p):
        latest = base / "latest"
        if latest.is_file():
            it = base / latest.read_text().strip()
            if (it / META_FILE).is_file():
                return it
            old = it.with_name(it.name + ".old")  # killed while re-saving that iteration
            if not it.exists() and (old / META_FILE).is_file():
                return old
    return None


def require(path: str | Path) -> Path:
    it = resolve(path)
    if it is None:
        raise ConfigError(
            f"no checkpoint at {path}: expected a run directory with checkpoints/latest, or an "
            f"iteration folder holding {CONFIG_FILE} and {META_FILE}"
        )
    return it


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # truncated / hand-broken: one line naming the file
        raise ConfigError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None


def read_model_config(path: str | Path) -> ModelConfig:
    it = require(path)
    try:
        cfg = build(ModelConfig, _read_json(it / CONFIG_FILE), "model.")
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{it / CONFIG_FILE}: {e}") from None
    return cfg


def read_meta(path: str | Path) -> dict:
    meta = _read_json(require(path) / META_FILE)
    if not isinstance(meta, dict):
        raise ConfigError(f"{require(path) / META_FILE} must hold a JSON object")
    return meta


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


# test hook: act as if renameat2 were missing (the kill sweep covers the two-rename fallback)
NO_EXCHANGE_ENV = "MINITRON_PRUNE_NO_EXCHANGE"


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    import ctypes
    import ctypes.util

    if os.environ.get(NO_EXCHANGE_ENV) == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    r = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE)
    if r != 0:
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: filesystem lacks it
            return False
        raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")
    return True


def save(
    run_dir: str | Path,
    iteration: int,
    model_cfg: ModelConfig,
    sharded_state_dict: dict,
    meta: dict,
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it with its own sharded state dict."""
    from ..compat import mcore

    final = iteration_dir(run_dir, iteration)
    partial = final.with_name(final.name + ".partial")
    if is_rank0():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    from ..preempt import shield

    with shield():  # its writer's helper process must survive a stop signal to the whole job
        mcore.dist_checkpointing.save(sharded_state_dict, str(partial))
    barrier()
    if is_rank0():
        _write_json_atomic(partial / CONFIG_FILE, model_cfg.to_dict())
        _write_json_atomic(partial / META_FILE, dict(meta, iteration=iteration,
                                                     megatron_core=mcore.MCORE_VERSION))
        if final.exists():  # re-saving the iteration `latest` may name (a resumed run that
            # stopped before its first step): never leave `latest` pointing at nothing
            if exchange(partial, final):  # final = new, partial = old, in one step
                shutil.rmtree(partial)
            else:  # two renames; resolve() falls back to the .old copy if killed between them
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(partial, final)
                shutil.rmtree(old)
        else:
            os.replace(partial, final)
        tmp = final.parent / "latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, final.parent / "latest")
        _prune_old(final.parent, keep_last)
    barrier()
    return final


def _prune_old(ckpt_dir: Path, keep_last: int) -> None:
    # complete iterations only: not iter_*.partial, nor a prune's iter_*.orig backup
    its = sorted(p for p in ckpt_dir.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for p in its[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def load(path: str | Path, sharded_state_dict: dict) -> dict:
    """Collective load of the tensors named by `sharded_state_dict` (any TP/PP layout)."""
    from ..compat import mcore, torch_dist

    it = require(path)
    torch_dist.check_files(it)  # missing / truncated shard or .metadata: one-line error first
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        return mcore.dist_checkpointing.load(sharded_state_dict, str(it))
    except MemoryError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a damaged item / another model
        inner = e
        if isinstance(e, CheckpointException) and e.failures:  # rank -> (exception, trace)
            inner = next(iter(e.failures.values()))[0]
        if "out of memory" in str(inner).lower():
            raise
        first = (str(inner).strip().splitlines() or [""])[0][:200]
        raise torch_dist.FormatError(f"{it}: megatron's loader failed ({type(inner).__name__}: {first}); "
                                     "the checkpoint is damaged or was written for another model") from e


def load_model_weights(path: str | Path, model) -> dict:
    """Load only the model's tensors into `model` (a bare or DDP-wrapped megatron model)."""
    module = getattr(model, "module", model)
    state = load(path, {"model": module.sharded_state_dict()})
    module.load_state_dict(state["model"], strict=True)
    return read_meta(path)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
