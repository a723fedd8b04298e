"""megatron-core's dataset index caches, published atomically.

megatron's GPTDataset (`_build_document_sample_shuffle_indices`) and BlendedDataset
(`_build_indices`) write a missing index cache in place: the description file first, then
each .npy with `numpy.save`; a builder that finds all of a cache's files present loads them
with `numpy.load(mmap_mode="r")` without asking whether they are complete. megatron orders
only the ranks of one job (rank 0 builds, barrier, the others load), so a second job on the
same data, or a second builder in one process, can load an .npy that is still being written
("ValueError: mmap length is greater than file size", or a short index), and two rank 0s
that both miss rewrite (truncate) each other's files under readers that mapped them.

The classes here keep megatron's names (`type(self).__name__` is part of the cache file
names and of the description hash, so the caches are the very files megatron writes and
reads) and change one thing: a missing cache is built in a private folder inside the cache
folder, then published with `os.replace`, the .npy files first and the description last.
A file in the cache folder is therefore always complete and never written again (a later
publisher replaces the name, not the bytes: readers keep the inode they mapped), and
megatron's "all files exist" test only passes once every file is in place. No lock is
needed, so it holds on cluster file systems where flock is absent or node-local.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import tempfile

import torch

from .mcore import BlendedDataset as _BlendedDataset
from .mcore import BlendedMegatronDatasetBuilder as _Builder
from .mcore import GPTDataset as _GPTDataset

_GPT_FILES = ("document_index.npy", "sample_index.npy", "shuffle_index.npy", "description.txt")
_BLEND_FILES = ("dataset_index.npy", "dataset_sample_index.npy", "description.txt")
TMP_PREFIX = ".tmp-"


def _published(ds, split_name: str, suffixes: tuple, build):
    """Run megatron's index build `build` so that what it writes appears in
    `ds.config.path_to_cache` only as complete files (module docstring)."""
    config = ds.config
    cache = config.path_to_cache
    if (not cache or getattr(config, "defer_npy_index_mmap", False)
            or getattr(config, "fast_cache_load", False)):
        return build()  # no cache, or megatron's lazy / assume-hit modes: unchanged
    base = f"{ds.unique_description_hash}-{type(ds).__name__}-{split_name}-"
    if all(os.path.isfile(os.path.join(cache, base + s)) for s in suffixes):
        return build()  # published, hence complete: megatron loads it
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return build()  # megatron loads what this job's rank 0 published before its barrier
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=cache)
    try:
        ds.config = copy.copy(config)  # this dataset's own copy; the builder shares `config`
        ds.config.path_to_cache = tmp
        out = build()  # a miss in the empty folder: megatron builds and writes there
        # the description last: megatron treats the cache as present once it exists
        for name in sorted(os.listdir(tmp), key=lambda n: n.endswith("description.txt")):
            src = os.path.join(tmp, name)
            try:  # the bytes reach the disk before the name does (crash safety only)
                fd = os.open(src, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
            os.replace(src, os.path.join(cache, name))
    finally:
        ds.config = config
        shutil.rmtree(tmp, ignore_errors=True)
    return out  # megatron returns the arrays it built in memory, not views of the files


class GPTDataset(_GPTDataset):
    """megatron's GPTDataset whose index cache is published atomically."""

    def _build_document_sample_shuffle_indices(self):
        return _published(self, self.index_split.name, _GPT_FILES,
                          super()._build_document_sample_shuffle_indices)


class BlendedDataset(_BlendedDataset):
    """megatron's BlendedDataset whose index cache is published atomically."""

    def _build_indices(self):
        return _published(self, self.split.name, _BLEND_FILES, super()._build_indices)


class BlendedMegatronDatasetBuilder(_Builder):
    """megatron's builder, building the BlendedDataset above (it names megatron's class)."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is _BlendedDataset:
            cls = BlendedDataset
        return _Builder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)
