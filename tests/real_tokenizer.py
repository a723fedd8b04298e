"""A real Hugging Face tokenizer folder for tests, with none of this project's special tokens.

Byte-level BPE trained with Hugging Face `tokenizers` on real English text (the Zen of
Python and stdlib module docstrings), special tokens `<unk>`, `<s>`, `</s>` (eos), no
`<|endoftext|>` and no `<pad>`, saved by transformers' PreTrainedTokenizerFast as
tokenizer.json + tokenizer_config.json (what import-hf copies to <run>/tokenizer/).
"""

from __future__ import annotations

import codecs
import contextlib
import io
from pathlib import Path


def english_paragraphs() -> list[str]:
    import argparse
    import collections
    import json
    import textwrap

    with contextlib.redirect_stdout(io.StringIO()):
        import this as zen  # prints the Zen on first import; rot13 text in this.s
    parts = [ln for ln in codecs.decode(zen.s, "rot13").splitlines() if ln.strip()]
    for mod in (json, argparse, collections, textwrap, contextlib, codecs, io):
        parts += [p.strip() for p in (mod.__doc__ or "").split("\n\n") if p.strip()]
    return parts


def make_tokenizer_folder(out: Path, vocab_size: int = 384) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(english_paragraphs(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out
