"""The stages' data entry points: `check_data` (fail before a model is built) and `datasets`
(train/valid/test through megatron's BlendedMegatronDatasetBuilder). Pretrain, eval, stats,
distill, search, ablations and report read their tokens through these two.

`data` is a DataConfig and `model` a ModelConfig (duck-typed: this package does not import
`config`, which imports it)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from .blend import check_data as _check_blend, default_cache_dir
from .datasets import build_gpt_datasets
from .tokenizer import Tokenizer


def check_data(data: Any, model: Any = None) -> dict:
    """Fail before any model is built if a dataset (one prefix or a blend) or the tokenizer
    is missing, or holds more tokens than the model's vocabulary (data.blend.check_data)."""
    return _check_blend(data, None if model is None else model.vocab_size)


def datasets(data: Any, seq_length: int, train_samples: Optional[int], valid_samples: int,
             barrier: Optional[Callable[[], None]] = None):
    """(train, valid, test) through megatron's BlendedMegatronDatasetBuilder (one prefix or
    a blend); every stage that reads tokens builds its datasets here. `barrier` defaults to
    `megatron_minitron.dist.barrier` (rank 0 builds the index cache, the others wait)."""
    if barrier is None:
        from ..dist import barrier

    tok = Tokenizer(data.tokenizer, data.eod_token)
    return build_gpt_datasets(
        data.prefix, tok, seq_length, data.split,
        {"train": train_samples, "valid": valid_samples, "test": 0}, data.seed,
        cache_dir=str(default_cache_dir(data.prefix)), barrier=barrier,
    )
