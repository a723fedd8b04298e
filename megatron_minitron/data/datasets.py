"""megatron GPT datasets over prepared indexed data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

from .common import DataError, _file_lock, sha256_file
from .tokenizer import Tokenizer


_SPLIT_NAMES = ("train", "valid", "test")


def build_gpt_datasets(
    prefix: str,
    tokenizer: Union[Tokenizer, str, Path],
    seq_length: int,
    split: str = "98,2,0",
    num_samples: Optional[dict] = None,
    seed: int = 1234,
    cache_dir: Optional[Union[str, Path]] = None,
    barrier: Optional[Callable[[], None]] = None,
    rank: Optional[int] = None,
    create_attention_mask: bool = True,
):
    """(train, valid, test) megatron `GPTDataset`s over `prefix.{bin,idx}`; None where a
    split's weight is 0.

    Each sample is a dict of tensors: `tokens` and `labels` [seq_length] (int64; labels are
    tokens shifted by one: the sample spans seq_length + 1 stored tokens and crosses document
    boundaries), `loss_mask` [seq_length] float, `position_ids` [seq_length] and, when
    `create_attention_mask`, `attention_mask` [1, seq_length, seq_length] bool (True =
    masked). `num_samples` maps "train"/"valid"/"test" to the number of samples wanted
    (megatron repeats epochs to reach it); a missing or None entry means one epoch.

    Index caches (document/sample/shuffle .npy files) live in a per-prefix folder,
    `cache_dir/<name>-<idx sha256[:12]>` (default `cache_dir` is `<prefix dir>/cache`), so a
    rewritten dataset never meets stale indices. Concurrent builders are safe:
    - with torch.distributed initialised, megatron itself builds on rank 0, calls
      `torch.distributed.barrier()`, then the other ranks load (all ranks must call this);
    - otherwise an exclusive file lock in the cache folder serialises the builds, and when
      `barrier` is given, rank 0 (`rank`, else $RANK, else 0) builds first, then `barrier()`
      is called on every rank, then the other ranks build (they load rank 0's cache).
    """
    import torch
    from ..compat.mcore import BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    prefix = str(prefix)
    idx_path = Path(f"{prefix}.idx")
    if not idx_path.is_file() or not Path(f"{prefix}.bin").is_file():
        raise DataError(f"no indexed dataset at {prefix}.bin/.idx; run the prepare-data stage first")
    weights = [w.strip() for w in split.split(",")]
    if len(weights) != 3:
        raise DataError(f"split={split!r} must be three weights 'train,valid,test', e.g. '98,2,0'")
    num_samples = dict(num_samples or {})
    unknown = set(num_samples) - set(_SPLIT_NAMES)
    if unknown:
        raise DataError(f"num_samples keys {sorted(unknown)} unknown; use {list(_SPLIT_NAMES)}")
    sizes = [num_samples.get(name) for name in _SPLIT_NAMES]

    base = Path(cache_dir) if cache_dir is not None else Path(prefix).parent / "cache"
    path_to_cache = base / f"{Path(prefix).name}-{sha256_file(idx_path)[:12]}"
    path_to_cache.mkdir(parents=True, exist_ok=True)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        path_to_cache=str(path_to_cache),
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )

    def _build():
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # megatron sequences rank 0 / barrier / other ranks inside build_generic_dataset;
        # a file lock here would deadlock against that barrier.
        datasets = _build()
    else:
        lock = path_to_cache / ".build.lock"
        if barrier is None:
            with _file_lock(lock):
                datasets = _build()
        else:
            r = int(rank if rank is not None else os.environ.get("RANK", 0))
            datasets = None
            if r == 0:
                with _file_lock(lock):
                    datasets = _build()
            barrier()
            if r != 0:
                with _file_lock(lock):
                    datasets = _build()
    train_ds, valid_ds, test_ds = datasets
    return train_ds, valid_ds, test_ds
