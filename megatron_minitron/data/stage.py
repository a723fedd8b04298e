"""The prepare-data stage: corpus -> tokenizer -> indexed dataset -> summary.json."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .blend import tokenizer_model_sha256
from .common import DataError, _atomic_write_json, sha256_file
from .docs_corpus import builtin_corpus, is_builtin
from .corpus import corpus_files
from .indexed import default_workers, write_indexed_dataset
from .tokenizer import Tokenizer, train_tokenizer

DATASET_NAME = "corpus_text_document"
# Bump when the meaning of prepared outputs changes, so old outputs are rebuilt.
_FORMAT_VERSION = 1


@dataclass
class DataPrepConfig:
    """The prepare-data stage.

    `corpus`: a .txt file (one document per paragraph), a JSON Lines file (.jsonl,
    .jsonl.gz; one document per line, the `text_key` field), a Parquet file (`text_key`
    column), a folder of such files or a glob; empty means the default corpus.
    `tokenizer`: empty trains a byte-level BPE of `vocab_size` (0: 4096) tokens on the
    corpus; else an existing tokenizer: a tokenizer.json or a Hugging Face tokenizer folder
    such as `<run>/tokenizer/` written by import-hf (its vocabulary is used: vocab_size,
    e.g. the default recipe's 4096, is then not used; the log and summary.json say so).
    `eod_token`: the token appended to every document; empty = the tokenizer's eos token
    (or `<|endoftext|>`). `workers`: tokenizing processes (0: cpu count - 1, at most 8).
    `seed` does not affect the outputs; it is recorded in summary.json as the default seed
    for dataset shuffling.
    """

    output_dir: str = "data/default"
    vocab_size: int = 0
    corpus: str = ""
    tokenizer: str = ""
    eod_token: str = ""
    text_key: str = "text"
    workers: int = 0
    progress: bool = True
    seed: int = 1234


DEFAULT_VOCAB_SIZE = 4096


def _cfg_get(cfg: Any, name: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _files_sha256(files: list) -> str:
    """sha256 of one file, or over the (name, sha256) of several."""
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.resolve()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def prepare_data(cfg: Any, log: Callable[[str], None] = print) -> dict:
    """Corpus -> tokenizer -> `corpus_text_document.{bin,idx}` -> summary.json.

    `cfg` is a `DataPrepConfig` (or any object/dict with its fields). Steps whose outputs
    exist and were made from identical inputs (sha256 of corpus files and tokenizer, vocab
    size, text key) are skipped. Returns the summary dict.
    """
    t0 = time.time()
    out = Path(_cfg_get(cfg, "output_dir", "data/default"))
    vocab_size = int(_cfg_get(cfg, "vocab_size", 0) or 0)
    corpus_arg = str(_cfg_get(cfg, "corpus", "") or "")
    tok_arg = str(_cfg_get(cfg, "tokenizer", "") or "")
    eod_token = str(_cfg_get(cfg, "eod_token", "") or "")
    text_key = str(_cfg_get(cfg, "text_key", "text") or "")
    workers = int(_cfg_get(cfg, "workers", 0) or 0) or default_workers()
    progress = bool(_cfg_get(cfg, "progress", True))
    seed = int(_cfg_get(cfg, "seed", 1234))
    doc_sep = "\n\n"
    # every user error before any work
    if vocab_size < 0 or int(_cfg_get(cfg, "workers", 0) or 0) < 0:
        raise DataError("vocab_size and workers must be >= 0 (0 = default)")
    if not text_key:
        raise DataError("text_key is empty; give the JSON key / Parquet column of the text, e.g. text")
    if eod_token and not tok_arg:
        raise DataError(f"eod_token={eod_token!r} names a token of an existing tokenizer; give "
                        "tokenizer=... too (a trained BPE ends documents with <|endoftext|>)")
    # a given tokenizer brings its vocabulary: vocab_size (the size of a BPE trained here,
    # e.g. the default recipe's 4096) is not used; said in the log and summary.json
    vocab_size_unused = vocab_size if tok_arg else None
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
    tokenizer = Tokenizer(tok_arg, eod_token) if tok_arg else None
    if not is_builtin(corpus_arg):
        files = corpus_files(corpus_arg)
        corpus_source = ",".join(str(f.resolve()) for f in files[:3]) + (
            f",... ({len(files)} files)" if len(files) > 3 else "")
    else:  # "" = the default corpus (docs_corpus.py), "builtin:NAME" another built-in one
        path, corpus_source = builtin_corpus(corpus_arg, out, log)
        files = [path]

    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    try:
        previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        previous = {}
    prev_inputs = previous.get("inputs", {})
    prev_sha = previous.get("sha256", {})

    # 1. corpus
    corpus_sha = _files_sha256(files)
    size = sum(f.stat().st_size for f in files)
    log(f"[prepare-data] corpus {corpus_arg or files[0]} ({len(files)} file(s), {size / 1e6:.2f} MB, "
        f"sha256 {corpus_sha[:12]})")

    inputs = {
        "format_version": _FORMAT_VERSION,
        "corpus_sha256": corpus_sha,
        "vocab_size_requested": vocab_size,
        "doc_sep": doc_sep,
    }
    if tokenizer is not None:  # keys only when set: earlier outputs stay valid
        inputs.update(tokenizer_sha256=tokenizer.sha256, eod=tokenizer.eod)
        inputs.pop("vocab_size_requested")
    if text_key != "text":
        inputs["text_key"] = text_key
    same_inputs = prev_inputs == inputs

    # 2. tokenizer
    if tokenizer is not None:
        tok_path = tokenizer.path
        tok_trained = False
        log(f"[prepare-data] tokenizer {tok_path}: {tokenizer.vocab_size} tokens, EOD id "
            f"{tokenizer.eod} ({tokenizer.inv_vocab.get(tokenizer.eod)!r})")
        if vocab_size_unused:
            log(f"[prepare-data] note: vocab_size={vocab_size_unused} is not used: it sizes a BPE "
                f"trained here, and tokenizer={tok_arg} brings its own {tokenizer.vocab_size} tokens")
    else:
        tok_path = out / "tokenizer.json"
        if same_inputs and tok_path.is_file() and sha256_file(tok_path) == prev_sha.get("tokenizer"):
            log(f"[prepare-data] tokenizer {tok_path} up to date")
            tok_trained = False
        else:
            t = time.time()
            train_tokenizer(files, vocab_size, tok_path, doc_sep=doc_sep, text_key=text_key)
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
        stats = write_indexed_dataset(files, tokenizer, prefix, doc_sep=doc_sep, text_key=text_key,
                                      workers=workers, progress=progress)
        log(f"[prepare-data] wrote {prefix}.{{bin,idx}} ({stats['seconds']:.1f} s, "
            f"{stats['tokens_per_s']:,.0f} tokens/s with {stats['workers']} worker(s))")

    summary = {
        "corpus": str(files[0]) if len(files) == 1 else corpus_arg,
        "corpus_files": len(files),
        "corpus_source": corpus_source,
        "tokenizer": str(tok_path),
        "prefix": str(prefix),
        **stats,
        "vocab_size": tokenizer.vocab_size,
        "vocab_size_requested": None if tok_arg else vocab_size,
        **({"vocab_size_not_used": vocab_size_unused} if vocab_size_unused else {}),
        "eod": tokenizer.eod,
        "pad": tokenizer.pad,
        "unigram_baseline_ppl": math.exp(stats["unigram_entropy"]),
        "seed": seed,
        "inputs": inputs,
        "sha256": {
            "corpus": corpus_sha,
            "tokenizer": tokenizer.sha256,  # what the stages' data check compares (blend.py)
            "tokenizer_model": tokenizer_model_sha256(tokenizer),
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
