"""Dataset blends in megatron's forms, and the checks stages run before reading tokens.

`data.prefix` takes:
- one prefix: "data/a/corpus_text_document";
- a blend: [w1, p1, w2, p2, ...] (weights normalised; megatron's `--data-path 0.3 A 0.7 B`)
  or [p1, p2, ...] (weighted by their sizes, megatron's rule for a blend without weights);
- per-split blends: {train: <one of the above>, valid: ..., test: ...} (megatron's
  `--train-data-path` etc.; `data.split` is then not used, a missing split is empty).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from .common import DataError

SPLIT_NAMES = ("train", "valid", "test")

Blend = tuple  # (prefixes: list[str], weights: Optional[list[float]])


def _one_blend(spec: Any, where: str) -> Blend:
    if isinstance(spec, (str, Path)):
        if not str(spec):
            raise DataError(f"{where} is empty; give a dataset prefix (<prefix>.bin/.idx)")
        return [str(spec)], None
    if not isinstance(spec, (list, tuple)) or not spec:
        raise DataError(f"{where}={spec!r}: give a prefix, [w1, p1, w2, p2, ...] or [p1, p2, ...]")
    if all(isinstance(x, (str, Path)) for x in spec):
        return [str(x) for x in spec], None
    if len(spec) % 2:
        raise DataError(f"{where}={spec!r}: a weighted blend alternates weight and prefix, "
                        "[w1, p1, w2, p2, ...]; this list has an odd length")
    weights, prefixes = [], []
    for i in range(0, len(spec), 2):
        w, p = spec[i], spec[i + 1]
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise DataError(f"{where}[{i}]={spec[i]!r} is not a weight; a weighted blend is "
                            "[w1, p1, w2, p2, ...]") from None
        if not (w >= 0) or w == float("inf"):
            raise DataError(f"{where}[{i}]={w}: weights must be finite and >= 0")
        if not isinstance(p, (str, Path)) or not str(p):
            raise DataError(f"{where}[{i + 1}]={p!r} is not a dataset prefix")
        weights.append(w)
        prefixes.append(str(p))
    if sum(weights) <= 0:
        raise DataError(f"{where}={spec!r}: the weights sum to 0")
    return prefixes, weights


def parse_blend(spec: Any, where: str = "data.prefix") -> dict:
    """{"blend": (prefixes, weights)} or {"per_split": [blend or None] * 3}; DataError with
    the fix when `spec` is none of megatron's forms."""
    if isinstance(spec, dict):
        unknown = set(spec) - set(SPLIT_NAMES)
        if unknown:
            raise DataError(f"{where} has unknown split(s) {sorted(unknown)}; per-split blends use "
                            f"the keys {list(SPLIT_NAMES)}")
        if not spec:
            raise DataError(f"{where} is an empty mapping; give at least train: <prefix or blend>")
        return {"per_split": [None if spec.get(s) in (None, "", []) else _one_blend(spec[s], f"{where}.{s}")
                              for s in SPLIT_NAMES]}
    return {"blend": _one_blend(spec, where)}


def all_prefixes(spec: Any) -> list[str]:
    parsed = parse_blend(spec)
    blends = [parsed["blend"]] if "blend" in parsed else [b for b in parsed["per_split"] if b]
    out: list[str] = []
    for prefixes, _ in blends:
        out += [p for p in prefixes if p not in out]
    return out


def require_files(spec: Any, where: str = "data.prefix") -> None:
    for p in all_prefixes(spec):
        for suffix in (".bin", ".idx"):
            if not Path(p + suffix).is_file():
                raise DataError(
                    f"{where}={p!r}: {p + suffix} not found; run `python -m megatron_minitron "
                    "prepare-data` or point data.prefix at your own megatron indexed dataset "
                    "(<prefix>.bin/.idx)")


def check_prefixes(spec: Any, tokenizer=None, model_vocab_size: Optional[int] = None,
                   where: str = "data.prefix") -> dict:
    """Fail before any model is built if a dataset of the blend is missing, was tokenized
    with another tokenizer than `tokenizer` (its prepare-data summary.json says so), or
    holds ids the model's vocabulary lacks. Returns the summary.json of a single prefix
    ({} when absent; for a blend {"blend": [summaries]})."""
    require_files(spec, where)
    summaries = []
    for p in all_prefixes(spec):
        sp = Path(p).parent / "summary.json"
        try:
            s = json.loads(sp.read_text()) if sp.is_file() else {}
        except (OSError, json.JSONDecodeError):
            s = {}
        if s.get("prefix") and Path(s["prefix"]).name != Path(p).name:
            s = {}  # a summary of another dataset in the same folder
        vocab = s.get("vocab_size")
        if vocab is not None and model_vocab_size is not None and vocab > model_vocab_size:
            raise DataError(
                f"dataset {p} was tokenized with a {vocab}-token vocabulary ({s.get('tokenizer')}) "
                f"but model.vocab_size={model_vocab_size}: its ids would index past the embedding. "
                f"Use a model with vocab_size >= {vocab} or re-run prepare-data with the model's "
                "tokenizer")
        if tokenizer is not None and vocab is not None and (
                vocab != tokenizer.vocab_size or s.get("eod", tokenizer.eod) != tokenizer.eod):
            raise DataError(
                f"dataset {p} was tokenized with {s.get('tokenizer')} ({vocab} tokens, EOD "
                f"{s.get('eod')}), not with data.tokenizer={str(tokenizer.path)!r} "
                f"({tokenizer.vocab_size} tokens, EOD {tokenizer.eod}); set data.tokenizer to "
                "the tokenizer the data was prepared with")
        summaries.append(s)
    return summaries[0] if len(summaries) == 1 else {"blend": summaries}


def check_data(data: Any, model_vocab_size: Optional[int] = None) -> dict:
    """`check_prefixes` for a DataConfig (prefix, tokenizer, eod_token), plus the
    tokenizer's own vocabulary against the model's."""
    from .tokenizer import Tokenizer

    require_files(data.prefix)
    if not Path(data.tokenizer).exists():
        raise DataError(f"data.tokenizer={data.tokenizer!r} not found (a tokenizer.json or a "
                        "Hugging Face tokenizer folder)")
    tok = Tokenizer(data.tokenizer, getattr(data, "eod_token", "") or "")
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise DataError(
            f"data.tokenizer={data.tokenizer!r} has {tok.vocab_size} tokens but "
            f"model.vocab_size={model_vocab_size}; use the model's own tokenizer, or a model "
            f"with vocab_size >= {tok.vocab_size}")
    return check_prefixes(data.prefix, tok, model_vocab_size)


def default_cache_dir(spec: Any) -> Path:
    return Path(all_prefixes(spec)[0]).parent / "cache"


def prefix_label(spec: Union[str, list, dict]) -> str:
    return spec if isinstance(spec, str) else json.dumps(spec)
