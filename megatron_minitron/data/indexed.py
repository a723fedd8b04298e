"""Writing and reading megatron's indexed dataset (.bin/.idx)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from .common import DataError, unigram_entropy
from .corpus import read_corpus, split_documents
from .tokenizer import Tokenizer


def write_indexed_dataset(
    corpus: Path, tokenizer: Tokenizer, prefix: Path, doc_sep: str = "\n\n"
) -> dict:
    """Tokenize `corpus` into megatron's indexed format `prefix.bin` / `prefix.idx`.

    One document per paragraph (split on `doc_sep`), EOD appended to each, one sequence
    per document. Token dtype is uint16 when the vocabulary fits, else int32. Returns
    {documents, tokens, dtype, unigram_entropy (nats/token over the written stream, EODs
    included), max_document_tokens, mean_document_tokens}.
    """
    from ..compat.mcore import DType, IndexedDatasetBuilder

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
    from ..compat.mcore import IndexedDataset

    if not IndexedDataset.exists(str(prefix)):
        raise DataError(f"no indexed dataset at {prefix}.bin/.idx; run the prepare-data stage first")
    return IndexedDataset(str(prefix), multimodal=False, mmap=mmap)
