"""Tokenizers: training the default byte-level BPE, and the wrapper megatron's datasets use."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from .common import DataError, sha256_file
from .corpus import read_corpus, split_documents

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


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
