"""The teacher-logits cache (issue 22): its files, its manifest and the checks that a
distillation run reads the cache that belongs to it.

Layout of a cache directory:
    manifest.json         what was cached: teacher (path + content fingerprint), tokenizer
                          (sha256), data (prefix, split, seed), sequence length, samples,
                          top_k, temperature, dtype; `complete` once every shard is there
    shards/000000.bin     samples [j * S, (j + 1) * S) of the training set (S = shard_samples),
                          raw little-endian arrays back to back: ids int32 [n, seq, K],
                          logprobs (float32 | float16) [n, seq, K], log_rest float32 [n, seq],
                          token hashes int64 [n]
    shards/000000.json    written after the .bin is renamed into place: the shard is complete
                          (its sample range and sha256)

Sample i is sample i of the training dataset that `datasets(data, seq, samples, ...)` builds:
the order every distill reads (MicroBatches: global batch t holds samples [t*G, (t+1)*G) at
any DP / TP / PP layout), so one cache serves every run over the same tokens. Each sample's
token hash is checked against the tokens the run actually reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError

MANIFEST = "manifest.json"
# test hook (tests/dist/test_distill_dist.py's placed kills): "write:J" holds the writer in
# the middle of shard J's .bin, "after:J" once shard J is complete, until it is killed
HOLD_ENV = "MINITRON_TEACHER_LOGITS_HOLD"
VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}


def bytes_per_token(top_k: int, dtype: str = "float32") -> int:
    """Cache bytes per token: K int32 ids + K log-probs + one float32 log rest mass (the
    per-sample hash, 8 bytes a sequence, is left out)."""
    return top_k * (4 + np.dtype(DTYPES[dtype]).itemsize) + 4


def token_hash(tokens) -> int:
    """A 64-bit hash of one sample's token ids (int64 little-endian bytes)."""
    a = np.ascontiguousarray(np.asarray(tokens, dtype="<i8"))
    return int.from_bytes(hashlib.blake2b(a.tobytes(), digest_size=8).digest(), "little", signed=True)


def _sha256_file(p: Path, h=None):
    h = h or hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def teacher_fingerprint(path) -> dict:
    """The teacher checkpoint's identity: its iteration folder, and a sha256 over its
    model_config.json, meta.json (which holds the run's validation loss and iteration) and
    the names and sizes of its shard files. Cheap: no weight is read."""
    from ..train import checkpoint as ckpt

    it = ckpt.require(path)
    h = hashlib.sha256()
    for name in (ckpt.CONFIG_FILE, ckpt.META_FILE):
        _sha256_file(it / name, h)
    for f in sorted(p for p in it.iterdir() if p.is_file() and p.name not in (ckpt.CONFIG_FILE, ckpt.META_FILE)):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return {"path": str(it.resolve()), "sha256": h.hexdigest()}


def tokenizer_sha256(data) -> str:
    from ..data.blend import tokenizer_model_sha256
    from ..data.tokenizer import Tokenizer

    return tokenizer_model_sha256(Tokenizer(data.tokenizer, data.eod_token))


def data_identity(data) -> dict:
    """The data settings that fix the training set's sample order."""
    return {"prefix": data.prefix, "split": data.split, "seed": data.seed, "eod_token": data.eod_token}


@dataclass
class Shard:
    """Byte layout of shard j (n samples)."""

    n: int
    seq: int
    k: int
    dtype: str

    def sizes(self) -> list[tuple[str, np.dtype, tuple]]:
        n, s, k = self.n, self.seq, self.k
        return [("ids", np.dtype("<i4"), (n, s, k)), ("logprobs", np.dtype(DTYPES[self.dtype]).newbyteorder("<"), (n, s, k)),
                ("log_rest", np.dtype("<f4"), (n, s)), ("hash", np.dtype("<i8"), (n,))]

    def nbytes(self) -> int:
        return sum(dt.itemsize * int(np.prod(sh)) for _, dt, sh in self.sizes())


def shard_range(j: int, shard_samples: int, samples: int) -> tuple[int, int]:
    return j * shard_samples, min((j + 1) * shard_samples, samples)


def num_shards(samples: int, shard_samples: int) -> int:
    return -(-samples // shard_samples)


def shard_done(root: Path, j: int) -> bool:
    return (root / "shards" / f"{j:06d}.json").is_file()


def write_shard(root: Path, j: int, a: int, arrays: dict, layout: Shard) -> None:
    """Write shard j atomically: the .bin under a temporary name, fsync, rename, then its
    .json marker (the shard counts only once the marker is there)."""
    d = root / "shards"
    d.mkdir(parents=True, exist_ok=True)
    final, tmp = d / f"{j:06d}.bin", d / f"{j:06d}.bin.tmp"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for name, dt, shape in layout.sizes():
            b = np.ascontiguousarray(arrays[name], dtype=dt).reshape(shape).tobytes()
            h.update(b)
            f.write(b)
            if name == "ids":
                hold(f"write:{j}", f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    marker = d / f"{j:06d}.json"
    mtmp = d / f"{j:06d}.json.tmp"
    mtmp.write_text(json.dumps({"shard": j, "samples": [a, a + layout.n], "sha256": h.hexdigest()}))
    os.replace(mtmp, marker)


def hold(point: str, f=None) -> None:
    if os.environ.get(HOLD_ENV) == point:
        import time

        if f is not None:
            f.flush()
        print(f"[teacher-logits] holding at {point}", flush=True)
        time.sleep(600)


class TeacherCache:
    """A complete cache, opened read-only: `get(indices)` -> the targets of those samples."""

    def __init__(self, root):
        self.root = Path(root)
        m = self.root / MANIFEST
        if not m.is_file():
            raise ConfigError(f"teacher_cache={str(root)!r}: no {MANIFEST} there; write the cache with "
                              "`teacher-logits` (configs/teacher_logits_default.yaml)")
        try:
            self.manifest = json.loads(m.read_text())
        except ValueError as e:
            raise ConfigError(f"{m} is not valid JSON ({e}); the cache is damaged") from None
        if self.manifest.get("version") != VERSION:
            raise ConfigError(f"{m}: cache version {self.manifest.get('version')!r}, this tool reads {VERSION}")
        if not self.manifest.get("complete"):
            raise ConfigError(f"teacher_cache={str(root)!r} is not complete (a `teacher-logits` run stopped "
                              "before its last shard); re-run the same command to finish it")
        mf = self.manifest
        self.samples, self.seq, self.k = mf["samples"], mf["seq_length"], mf["top_k"]
        self.shard_samples, self.dtype = mf["shard_samples"], mf["logprob_dtype"]
        self._maps: dict[int, dict] = {}

    def _shard(self, j: int) -> dict:
        if j not in self._maps:
            a, b = shard_range(j, self.shard_samples, self.samples)
            lay = Shard(b - a, self.seq, self.k, self.dtype)
            p = self.root / "shards" / f"{j:06d}.bin"
            if not p.is_file() or p.stat().st_size != lay.nbytes():
                raise ConfigError(f"{p}: missing or {p.stat().st_size if p.is_file() else 0} bytes, "
                                  f"expected {lay.nbytes()}; the cache is damaged (re-run `teacher-logits` "
                                  "with resume=false)")
            mm, off = {}, 0
            for name, dt, shape in lay.sizes():
                mm[name] = np.memmap(p, dtype=dt, mode="r", offset=off, shape=shape)
                off += dt.itemsize * int(np.prod(shape))
            self._maps[j] = mm
        return self._maps[j]

    def get(self, indices) -> dict:
        """Targets of training samples `indices` (ints): ids int64 [n, seq, K], logprobs
        fp32 [n, seq, K], log_rest fp32 [n, seq], hash int64 [n]."""
        out = {k: [] for k in ("ids", "logprobs", "log_rest", "hash")}
        for i in indices:
            i = int(i)
            if not 0 <= i < self.samples:
                raise ConfigError(f"sample {i} is not in teacher_cache={str(self.root)!r} ({self.samples} samples)")
            j = i // self.shard_samples
            r = i - j * self.shard_samples
            mm = self._shard(j)
            for k in out:
                out[k].append(np.asarray(mm[k][r]))
        return {"ids": torch.from_numpy(np.stack(out["ids"]).astype(np.int64)),
                "logprobs": torch.from_numpy(np.stack(out["logprobs"]).astype(np.float32)),
                "log_rest": torch.from_numpy(np.stack(out["log_rest"]).astype(np.float32)),
                "hash": torch.from_numpy(np.stack(out["hash"]))}

    def check_tokens(self, indices, tokens: torch.Tensor) -> None:
        """Refuse when the tokens a run reads for `indices` are not the cached ones."""
        want = self.get_hashes(indices)
        for i, t, h in zip(indices, tokens, want):
            if token_hash(t.cpu().numpy()) != h:
                raise ConfigError(
                    f"training sample {int(i)} holds other tokens than teacher_cache={str(self.root)!r} "
                    "recorded: the data files changed since the cache was written; re-run `teacher-logits`")

    def get_hashes(self, indices) -> list[int]:
        out = []
        for i in indices:
            j = int(i) // self.shard_samples
            out.append(int(self._shard(j)["hash"][int(i) - j * self.shard_samples]))
        return out

    def match(self, *, teacher: str, data, seq: int, samples_needed: int, temperature: float,
              where: str = "teacher_cache") -> None:
        """Refuse (naming the setting and the fix) a cache made for another run: another
        teacher, tokenizer, data, sequence length, order or temperature, or too few samples."""
        mf, name = self.manifest, f"{where}={str(self.root)!r}"
        fix = "write a cache for this run with `teacher-logits` (the same teacher, data and seq_length)"
        t = teacher_fingerprint(teacher)
        if t["sha256"] != mf["teacher"]["sha256"]:
            raise ConfigError(f"{name} was written for teacher {mf['teacher']['path']}, not teacher={teacher!r} "
                              f"({t['path']}): another checkpoint; {fix}")
        tok = tokenizer_sha256(data)
        if tok != mf["tokenizer_sha256"]:
            raise ConfigError(f"{name} was written with another tokenizer than data.tokenizer={data.tokenizer!r}; {fix}")
        mine, theirs = data_identity(data), mf["data"]
        for k in mine:
            if mine[k] != theirs.get(k):
                raise ConfigError(f"{name} was written with data.{k}={theirs.get(k)!r}, this run has "
                                  f"data.{k}={mine[k]!r} (another sample order); {fix}")
        if seq != self.seq:
            raise ConfigError(f"{name} holds sequences of {self.seq} tokens, this run trains at {seq}; "
                              f"set seq_length={self.seq} or {fix}")
        if abs(temperature - mf["temperature"]) > 1e-12:
            raise ConfigError(f"{name} holds the teacher's top-{self.k} at temperature {mf['temperature']}, this "
                              f"run distills at loss.temperature={temperature}; set loss.temperature="
                              f"{mf['temperature']} or write the cache with temperature={temperature}")
        if samples_needed > self.samples:
            raise ConfigError(f"{name} holds {self.samples} training sequences, this run reads {samples_needed} "
                              f"(train.steps x train.global_batch_size); re-run `teacher-logits` with "
                              f"samples={samples_needed} (the cached shards are kept only for the same samples: "
                              "use a new output_dir) or train fewer steps")

    def spot_check(self, ds, samples_needed: int, n: int = 64) -> None:
        """Before any model is built: the token hashes of n samples spread over the ones the
        run reads (the first and the last included) against `ds`."""
        idx = sorted(set(np.linspace(0, samples_needed - 1, num=min(n, samples_needed)).astype(int).tolist()))
        toks = torch.stack([torch.as_tensor(np.asarray(ds[i]["tokens"])) for i in idx])
        self.check_tokens(idx, toks)


def open_cache(path: Optional[str]) -> Optional[TeacherCache]:
    return TeacherCache(path) if path else None
