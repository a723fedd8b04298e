"""Writing and reading megatron's indexed dataset (.bin/.idx).

`write_indexed_dataset` streams a corpus (corpus.iter_documents) through worker processes
that tokenize batches of documents, and appends the results in corpus order with
`IndexedWriter`, so memory stays flat whatever the corpus size.

The output is what Megatron-LM's tools/preprocess_data.py writes for the same documents and
tokenizer (no --split-sentences, with --append-eod): a document's tokens are the
tokenizer's ids without special tokens (megatron's HuggingFaceTokenizer default), then EOD
when the document has any token; one sequence per document (a JSON list of strings: one
per non-empty string, as preprocess_data does); an empty document has no sequence; token dtype `DType.optimal_dtype(vocab_size)` (uint16 below
65500 tokens, else int32). Several input files give one dataset, in corpus_files order,
the same bytes as preprocess_data run per file and merged with `IndexedDatasetBuilder.add_index`.
Differences: preprocess_data reads one JSON Lines file (no .txt, .gz, Parquet, folders)
and fails on a blank line, which is skipped here; a .txt file is one document per
paragraph (blank-line separated), a format preprocess_data does not have.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from .common import DataError, unigram_entropy
from .corpus import corpus_files, iter_documents
from .tokenizer import Tokenizer


class IndexedWriter:
    """megatron's indexed dataset written as a stream.

    Tokens go straight to `<prefix>.bin`; per-sequence lengths and per-document sequence
    counts go to two spool files, and `finalize` assembles `<prefix>.idx` from them in
    fixed-size chunks. The files are byte-identical to megatron-core's
    `IndexedDatasetBuilder` (whose index lists live in memory) for the same documents.
    """

    _CHUNK = 1 << 20  # sequences per chunk when assembling the index

    def __init__(self, prefix: Union[str, Path], dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._bin = open(self.prefix + ".bin", "wb")
        self._lens = open(self.prefix + ".lens.tmp", "wb")  # int32 per sequence
        self._docs = open(self.prefix + ".docs.tmp", "wb")  # int64 end-sequence per document
        self.sequences = 0
        self.documents = 0

    def add_document(self, tokens: np.ndarray) -> None:
        """One document as one sequence; an empty document has no sequence."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        if tokens.size:
            self._bin.write(tokens.tobytes(order="C"))
            self._lens.write(np.int32(tokens.size).tobytes())
            self.sequences += 1
        self._docs.write(np.int64(self.sequences).tobytes())
        self.documents += 1

    def add_documents(self, flat: np.ndarray, seq_lengths: np.ndarray, seqs_per_doc: np.ndarray) -> None:
        """Many documents at once: `flat` holds their tokens back to back, `seq_lengths` the
        size of each (non-empty) sequence, `seqs_per_doc` how many sequences each has."""
        flat = np.asarray(flat, dtype=self.dtype)
        seq_lengths = np.asarray(seq_lengths, dtype=np.int32)
        self._bin.write(flat.tobytes(order="C"))
        self._lens.write(seq_lengths.tobytes())
        ends = self.sequences + np.cumsum(np.asarray(seqs_per_doc, dtype=np.int64))
        self._docs.write(ends.tobytes())
        self.sequences += int(seq_lengths.size)
        self.documents += int(len(seqs_per_doc))

    def finalize(self, idx_path: Optional[Union[str, Path]] = None) -> None:
        from ..compat.mcore import _INDEX_HEADER, DType

        for f in (self._bin, self._lens, self._docs):
            f.close()
        idx_path = str(idx_path or self.prefix + ".idx")
        lens_path, docs_path = self.prefix + ".lens.tmp", self.prefix + ".docs.tmp"
        itemsize = np.int64(self.dtype.itemsize)
        with open(idx_path, "wb") as out:
            out.write(_INDEX_HEADER)
            out.write(struct.pack("<Q", 1))
            out.write(struct.pack("<B", DType.code_from_dtype(self.dtype.type)))
            out.write(struct.pack("<Q", self.sequences))
            out.write(struct.pack("<Q", self.documents + 1))  # document_indices start with 0
            for chunk in self._chunks(lens_path, np.int32):
                out.write(chunk.tobytes())
            pointer = np.int64(0)
            for chunk in self._chunks(lens_path, np.int32):
                ends = np.cumsum(chunk.astype(np.int64) * itemsize) + pointer
                out.write((ends - chunk.astype(np.int64) * itemsize).tobytes())
                pointer = ends[-1] if ends.size else pointer
            out.write(np.int64(0).tobytes())
            for chunk in self._chunks(docs_path, np.int64):
                out.write(chunk.tobytes())
        os.remove(lens_path)
        os.remove(docs_path)

    def _chunks(self, path: str, dtype):
        with open(path, "rb") as f:
            while True:
                data = f.read(self._CHUNK * np.dtype(dtype).itemsize)
                if not data:
                    return
                yield np.frombuffer(data, dtype=dtype)

    def abort(self) -> None:
        for f in (self._bin, self._lens, self._docs):
            f.close()
        for suffix in (".bin", ".lens.tmp", ".docs.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


# ----------------------------------------------------------------------------- tokenizing


_WORKER_TOK: Optional[Tokenizer] = None


def _init_worker(path: str, eod_token: str) -> None:
    global _WORKER_TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER_TOK = Tokenizer(path, eod_token)


def encode_documents(tok: Tokenizer, docs: Sequence[Union[str, list]], dtype) -> tuple:
    """(flat tokens, sequence lengths, sequences per document) of `docs`, as preprocess_data
    encodes them: a string is one sequence; a list of strings (sentences) is one sequence
    per sentence with tokens; EOD ends the last sequence of any non-empty document."""
    flat_texts, owner = [], []
    for i, d in enumerate(docs):
        pieces = [d] if isinstance(d, str) else d
        flat_texts += pieces
        owner += [i] * len(pieces)
    ids = tok.tokenize_batch(flat_texts) if flat_texts else []
    seqs: list[list[int]] = [[] for _ in docs]
    for i, piece in zip(owner, ids):
        if piece:
            seqs[i].append(piece)
    seq_lengths, per_doc, chunks = [], np.zeros(len(docs), dtype=np.int64), []
    for i, pieces in enumerate(seqs):
        if pieces:
            pieces[-1] = list(pieces[-1]) + [tok.eod]
        per_doc[i] = len(pieces)
        for piece in pieces:
            seq_lengths.append(len(piece))
            chunks.append(np.asarray(piece, dtype=dtype))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    return flat, np.asarray(seq_lengths, dtype=np.int64), per_doc


def _worker_encode(docs, dtype):
    return encode_documents(_WORKER_TOK, docs, dtype)


def _batches(docs: Iterable, max_docs: int = 512, max_chars: int = 1 << 20):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d) if isinstance(d, str) else sum(map(len, d))
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def write_indexed_dataset(
    corpus: Any,
    tokenizer: Tokenizer,
    prefix: Path,
    doc_sep: str = "\n\n",
    text_key: str = "text",
    workers: int = 1,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Tokenize `corpus` (a file, folder, glob or list: corpus.corpus_files) into megatron's
    indexed format `prefix.bin` / `prefix.idx` (module docstring: the exact format).

    `workers` > 1 tokenizes in that many processes (spawned; each loads the tokenizer),
    with at most 2 x workers batches in flight, written in corpus order: the output does
    not depend on `workers`. `progress` shows a bar of input bytes on stderr. Returns
    {documents, tokens, dtype, unigram_entropy (nats/token over the written stream, EODs
    included), max_document_tokens, mean_document_tokens, workers, seconds, tokens_per_s}.
    """
    from ..compat.mcore import DType

    files = corpus_files(corpus)
    dtype = np.dtype(DType.optimal_dtype(tokenizer.vocab_size))
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Write under temporary names, then rename: a crash never leaves a half-written pair.
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    writer = IndexedWriter(tmp_prefix, dtype)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    max_len = 0
    total_bytes = sum(f.stat().st_size for f in files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare-data", file=sys.stderr,
                   mininterval=1.0, dynamic_ncols=True)
    t0 = time.time()

    def take(result) -> None:
        nonlocal max_len
        flat, seq_lengths, per_doc = result
        if flat.size and int(flat.max()) >= tokenizer.vocab_size:
            raise DataError(f"tokenizer {tokenizer.path} produced id {int(flat.max())} >= its "
                            f"vocab_size {tokenizer.vocab_size}")
        writer.add_documents(flat, seq_lengths, per_doc)
        counts[:] += np.bincount(flat, minlength=tokenizer.vocab_size)
        if per_doc.size:  # document sizes: sums of their consecutive sequences
            ends = np.cumsum(per_doc)
            csum = np.concatenate([[0], np.cumsum(seq_lengths)])
            max_len = max(max_len, int((csum[ends] - csum[ends - per_doc]).max()))
        if bar is not None:
            bar.set_postfix(docs=writer.documents, tokens=int(counts.sum()), refresh=False)

    docs = iter_documents(files, text_key, doc_sep, progress=bar.update if bar is not None else None)
    workers = max(1, int(workers))
    try:
        if workers == 1:
            for batch in _batches(docs):
                take(encode_documents(tokenizer, batch, dtype))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker,
                          initargs=(str(tokenizer.path), tokenizer.eod_token_arg)) as pool:
                pending: collections.deque = collections.deque()
                for batch in _batches(docs):
                    pending.append(pool.apply_async(_worker_encode, (batch, dtype)))
                    while len(pending) >= 2 * workers:
                        take(pending.popleft().get())
                while pending:
                    take(pending.popleft().get())
        writer.finalize(f"{tmp_prefix}.idx")
    except BaseException:
        writer.abort()
        if os.path.exists(f"{tmp_prefix}.idx"):
            os.remove(f"{tmp_prefix}.idx")
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.time() - t0
    if writer.sequences == 0:
        os.remove(f"{tmp_prefix}.bin")
        os.remove(f"{tmp_prefix}.idx")
        raise DataError(f"corpus {corpus} has no text")
    os.replace(f"{tmp_prefix}.bin", f"{prefix}.bin")
    os.replace(f"{tmp_prefix}.idx", f"{prefix}.idx")
    tokens = int(counts.sum())
    return {
        "documents": writer.documents,
        "tokens": tokens,
        "dtype": dtype.name,
        "unigram_entropy": unigram_entropy(counts),
        "max_document_tokens": max_len,
        "mean_document_tokens": tokens / max(writer.documents, 1),
        "workers": workers,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
    }


def read_indexed_dataset(prefix: Union[str, Path], mmap: bool = True):
    """megatron's `IndexedDataset` for `prefix` (item i is document i's tokens, EOD last)."""
    from ..compat.mcore import IndexedDataset

    if not IndexedDataset.exists(str(prefix)):
        raise DataError(f"no indexed dataset at {prefix}.bin/.idx; run the prepare-data stage first")
    return IndexedDataset(str(prefix), multimodal=False, mmap=mmap)
