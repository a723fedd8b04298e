"""Shared helpers of the data package: its error type, hashing, atomic writes, file locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import ConfigError


class DataError(ConfigError):
    """Data preparation or loading failed; the message says what to do."""


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock (fcntl) on `path`; serialises builds across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequency distribution given by `counts`.

    This is the cross-entropy a model reaches by predicting each token's corpus frequency,
    whatever the context: the "unigram baseline" that a trained LM must beat.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n <= 0:
        return 0.0
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())
