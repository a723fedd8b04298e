"""megatron GPT datasets over prepared indexed data."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

from .common import DataError, _file_lock, sha256_file
from .blend import all_prefixes, default_cache_dir, parse_blend
from .tokenizer import Tokenizer


_SPLIT_NAMES = ("train", "valid", "test")


def _tokens(prefix: str) -> int:
    from .indexed import read_indexed_dataset

    ds = read_indexed_dataset(prefix)  # keep it alive: its arrays view its mmap
    n = int(ds.sequence_lengths.sum())
    del ds
    return n


def _epoch_sizes(parsed: dict, sizes: list, split: str, seq_length: int) -> list:
    """megatron needs a sample count for a weighted blend; where none is asked for (one
    epoch), take the blend's tokens in that split / seq_length."""
    if "blend" in parsed:
        prefixes, weights = parsed["blend"]
        fractions = [float(x) for x in split.split(",")]
        fractions = [f / sum(fractions) for f in fractions]
        blends = [(parsed["blend"], fractions[i]) for i in range(3)]
    else:
        blends = [(b, 1.0) for b in parsed["per_split"]]
    out = list(sizes)
    for i, (blend, frac) in enumerate(blends):
        if out[i] is None and blend is not None and blend[1] is not None:
            tokens = sum(_tokens(p) for p in blend[0])
            out[i] = max(1, int(tokens * frac) // seq_length) if frac > 0 else 0
    return out


def build_gpt_datasets(
    prefix: Union[str, list, dict],
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
    """(train, valid, test) megatron datasets over `prefix` (one `prefix.{bin,idx}`, or a
    blend in megatron's forms: blend.py), built by megatron's BlendedMegatronDatasetBuilder:
    a `GPTDataset`, or a `BlendedDataset` of them for a blend; None where a split is empty.

    Each sample is a dict of tensors: `tokens` and `labels` [seq_length] (int64; labels are
    tokens shifted by one: the sample spans seq_length + 1 stored tokens and crosses document
    boundaries), `loss_mask` [seq_length] float, `position_ids` [seq_length] and, when
    `create_attention_mask`, `attention_mask` [1, seq_length, seq_length] bool (True =
    masked). `num_samples` maps "train"/"valid"/"test" to the number of samples wanted
    (megatron repeats epochs to reach it); a missing or None entry means one epoch (for a
    weighted blend: the blend's tokens in that split / seq_length samples).

    Index caches (document/sample/shuffle .npy files) live in a per-prefix folder,
    `cache_dir/<name>-<idx sha256[:12]>` (a blend: `blend-<sha256 of the blend and its .idx
    files>`; default `cache_dir` is `<first prefix dir>/cache`), so a
    rewritten dataset never meets stale indices. Concurrent builders are safe, whatever
    runs them (ranks of one job, several jobs on one shared file system, threads): a missing
    cache is built in a private folder and published by renames, the description file last
    (compat/index_cache.py), so no builder ever loads a file that is still being written.
    Who builds, to avoid duplicated work:
    - with torch.distributed initialised, megatron itself builds on rank 0, calls
      `torch.distributed.barrier()`, then the other ranks load (all ranks must call this);
    - otherwise an exclusive file lock in the cache folder serialises the builds on a host,
      and when `barrier` is given, rank 0 (`rank`, else $RANK, else 0) builds first, then
      `barrier()` is called on every rank, then the other ranks build (they load rank 0's
      cache).
    Without a process group, a blend's indices are built in memory (megatron's
    BlendedDataset needs torch.distributed to write its cache).
    """
    import torch
    from ..compat.index_cache import BlendedMegatronDatasetBuilder, GPTDataset
    from ..compat.mcore import GPTDatasetConfig

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    parsed = parse_blend(prefix)
    prefixes = all_prefixes(prefix)
    for p in prefixes:
        if not Path(f"{p}.idx").is_file() or not Path(f"{p}.bin").is_file():
            raise DataError(f"no indexed dataset at {p}.bin/.idx; run the prepare-data stage first")
    weights = [w.strip() for w in split.split(",")]
    if len(weights) != 3:
        raise DataError(f"split={split!r} must be three weights 'train,valid,test', e.g. '98,2,0'")
    num_samples = dict(num_samples or {})
    unknown = set(num_samples) - set(_SPLIT_NAMES)
    if unknown:
        raise DataError(f"num_samples keys {sorted(unknown)} unknown; use {list(_SPLIT_NAMES)}")
    sizes = [num_samples.get(name) for name in _SPLIT_NAMES]
    sizes = _epoch_sizes(parsed, sizes, split, seq_length)

    # one cache folder per (dataset files, blend): a rewritten dataset never meets stale indices
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir(prefix)
    if len(prefixes) == 1 and "blend" in parsed:
        name = f"{Path(prefixes[0]).name}-{sha256_file(Path(prefixes[0] + '.idx'))[:12]}"
    else:
        h = hashlib.sha256(json.dumps(parsed, sort_keys=True).encode())
        for p in prefixes:
            h.update(sha256_file(Path(p + ".idx")).encode())
        name = f"blend-{h.hexdigest()[:12]}"
    path_to_cache = base / name
    path_to_cache.mkdir(parents=True, exist_ok=True)

    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    # megatron's BlendedDataset asks torch.distributed for the rank when it writes its cache;
    # without a process group a blend's indices are built in memory instead (no cache)
    use_cache = dist_on or (len(prefixes) == 1 and "blend" in parsed and parsed["blend"][1] is None)
    blend_kw = ({"blend": parsed["blend"], "split": split} if "blend" in parsed
                else {"blend_per_split": parsed["per_split"], "split": None})
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        **blend_kw,
        path_to_cache=str(path_to_cache) if use_cache else None,
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )

    def _build():
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    if dist_on:
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
    for ds in datasets:
        _repair_loss_mask_cache(ds)
    train_ds, valid_ds, test_ds = datasets
    return train_ds, valid_ds, test_ds


def _repair_loss_mask_cache(ds) -> None:
    """megatron-core (0.16 and 0.19) GPTDataset caches the FIRST sample's loss mask by
    reference and then zeroes that sample's <pad> labels in it in place, so every later
    sample also masks the first one's pad positions (NVIDIA/Megatron-LM#1711, open PR
    #6981). Fill the cache once and reset it to all ones: the cacheable case is exactly
    the one without eod_mask_loss, whose mask before the pad step is all ones."""
    import torch

    if ds is None:
        return
    for d in getattr(ds, "datasets", None) or [ds]:  # a BlendedDataset holds GPTDatasets
        if getattr(d, "masks_and_position_ids_are_cacheable", False) and len(d) > 0:
            if not d.masks_and_position_ids_are_cached:
                d[0]  # the FILL call; it leaves sample 0's pad zeros in the cache
            d.cached_loss_mask = torch.ones_like(d.cached_loss_mask)
