"""Tokenizers: training the default byte-level BPE, and the wrapper megatron's datasets use."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .common import DataError, sha256_file
from .corpus import corpus_files, iter_documents

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def train_tokenizer(corpus: Any, vocab_size: int, out: Path, doc_sep: str = "\n\n",
                    text_key: str = "text") -> Path:
    """Train a byte-level BPE on `corpus` (a file, folder, glob or list: corpus.corpus_files)
    and save it as `out` (tokenizer.json).

    Ids 0 and 1 are `<|endoftext|>` (EOD) and `<pad>`, then the 256 byte symbols, then
    merges. Training streams the same documents that `write_indexed_dataset` writes. The
    result is deterministic for a given corpus and vocab_size (the BPE trainer breaks count
    ties by pair id). The vocabulary may come out smaller than `vocab_size` on a tiny corpus.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    n_special = 2
    min_vocab = 256 + n_special
    if vocab_size < min_vocab:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use >= {min_vocab}")
    files = corpus_files(corpus)
    seen = [0]

    def docs():
        for d in iter_documents(files, text_key, doc_sep):
            seen[0] += 1
            yield d if isinstance(d, str) else "".join(d)

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
    tok.train_from_iterator(docs(), trainer=trainer)
    if not seen[0]:
        raise DataError(f"corpus {corpus} has no text")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tok.save(str(tmp), pretty=True)
    os.replace(tmp, out)
    return out


def _folder_files_sha(folder: Path) -> str:
    """sha256 over the tokenizer files of a folder (names and contents, sorted by name)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name in TOKENIZER_FILES:
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


# Files that make up a Hugging Face tokenizer (what import-hf copies to <run>/tokenizer/).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _token_content(v: Any) -> Optional[str]:
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    """A tokenizer wrapped for megatron-core's `GPTDatasetConfig.tokenizer`.

    `path` is a tokenizer.json file (read with Hugging Face `tokenizers`), or a folder that
    transformers' AutoTokenizer loads (tokenizer.json and/or a SentencePiece tokenizer.model,
    with tokenizer_config.json), such as `<run>/tokenizer/` written by import-hf.

    Text is encoded without special tokens (no BOS), as megatron's HuggingFaceTokenizer does
    by default. The end-of-document id (`eod`, appended to every document) is `eod_token`
    when given, else the tokenizer's eos token (tokenizer_config.json), else `<|endoftext|>`
    when the vocabulary has it (the BPE prepare-data trains). `pad` is the tokenizer's pad
    token, else `<pad>`, else -1 (none).

    megatron-core reads `eod`, `pad`, `vocab_size` and hashes `unique_identifiers` (JSON)
    into its dataset-index cache names; the tokenizer files' sha256 is part of it, so a
    changed tokenizer never reuses stale indices.
    """

    def __init__(self, path: Union[str, Path], eod_token: str = ""):
        self.path = Path(path)
        self.eod_token_arg = eod_token or ""
        if self.path.is_dir():
            self._init_folder()
        elif self.path.is_file():
            self._init_file()
        else:
            raise DataError(
                f"tokenizer {self.path} not found; give a tokenizer.json, a Hugging Face tokenizer "
                "folder (e.g. <run>/tokenizer/ written by import-hf), or run prepare-data first")
        vocab = self.vocab
        eod = self._resolve_eod(vocab)
        pad = self._special.get("pad_token")
        pad = vocab.get(pad) if pad else vocab.get(PAD_TOKEN)
        self.eod: int = int(eod)
        # no pad token: -1, megatron's own "no pad" id (never in the data; its GPTDataset masks
        # labels equal to pad, so pad must not be a real token such as eod)
        self.pad: int = int(pad) if pad is not None else -1
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

    def _init_file(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"tokenizer {self.path} is not a Hugging Face tokenizer.json ({err}); "
                            "give a tokenizer.json or a tokenizer folder") from None
        self._hf = None
        self.sha256 = sha256_file(self.path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        side = self.path.parent / "tokenizer_config.json"
        tc = json.loads(side.read_text()) if side.is_file() else {}
        self._special = {k: _token_content(tc.get(k)) for k in ("eos_token", "pad_token")}

    def _init_folder(self) -> None:
        if not any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise DataError(f"tokenizer folder {self.path} has no tokenizer.json, tokenizer.model or "
                            "vocab.json; give the folder of a Hugging Face tokenizer")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f"tokenizer={self.path} is a folder: reading it needs transformers "
                            "(pip install transformers), or give its tokenizer.json file") from None
        try:
            self._hf = AutoTokenizer.from_pretrained(str(self.path))
        except Exception as err:
            raise DataError(f"transformers' AutoTokenizer cannot load {self.path}: {err}") from None
        self._tok = getattr(self._hf, "_tokenizer", None)  # the Rust tokenizer of a fast one
        self.sha256 = _folder_files_sha(self.path)
        self.vocab_size = int(len(self._hf))
        self._special = {"eos_token": self._hf.eos_token, "pad_token": self._hf.pad_token}

    def _resolve_eod(self, vocab: dict) -> int:
        name = self.eod_token_arg or self._special.get("eos_token") or (
            EOD_TOKEN if EOD_TOKEN in vocab else None)
        if name is None:
            raise DataError(
                f"tokenizer {self.path} names no end-of-document token (no eos_token in a "
                f"tokenizer_config.json, no {EOD_TOKEN!r}); name one that it has with eod_token=..., "
                "e.g. eod_token='</s>'")
        if name not in vocab:
            raise DataError(f"eod_token={name!r} is not in the vocabulary of tokenizer {self.path}; "
                            "give a token it has (e.g. its eos token)")
        return vocab[name]

    # megatron's MegatronTokenizer interface names
    @property
    def eos(self) -> int:
        return self.eod

    @property
    def vocab(self) -> dict:
        if self._hf is not None:
            return self._hf.get_vocab()
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._hf is None:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self._hf is None:
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad})")
