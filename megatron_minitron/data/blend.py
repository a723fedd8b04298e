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
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .common import DataError, sha256_file

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
        stem, ext = p[:-4], p[-4:]
        if ext in (".bin", ".idx") and stem and not Path(p + ".bin").is_file():
            # refused, not stripped: megatron's --data-path takes the prefix too, and the
            # datasets' cache names are made from the prefix as written
            fix = f"{where}={stem}" if isinstance(spec, (str, Path)) else stem
            if not (Path(stem + ".bin").is_file() and Path(stem + ".idx").is_file()):
                fix += f" ({stem}.bin/.idx not found either)"
            raise DataError(f"{where} names {p!r}, a file of the dataset; give its prefix, "
                            f"without {ext}: {fix}")
        for suffix in (".bin", ".idx"):
            if not Path(p + suffix).is_file():
                raise DataError(
                    f"{where}={p!r}: {p + suffix} not found; run `python -m megatron_minitron "
                    "prepare-data` or point data.prefix at your own megatron indexed dataset "
                    "(<prefix>.bin/.idx)")


def tokenizer_model_sha256(tokenizer) -> str:
    """sha256 of the file that holds a tokenizer's vocabulary and merges: the tokenizer.json
    (or SentencePiece tokenizer.model) itself, or inside a tokenizer folder; for a folder of
    other files (vocab.json + merges.txt) the folder's hash. prepare-data records it in
    summary.json (sha256.tokenizer_model) next to sha256.tokenizer, so a folder and its own
    tokenizer.json count as the same tokenizer."""
    path = Path(tokenizer.path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return sha256_file(path / name)
    return tokenizer.sha256


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _recorded_hashes(s: dict) -> dict:
    rec = s.get("sha256")
    return {k: v for k, v in rec.items() if isinstance(v, str) and v} if isinstance(rec, dict) else {}


def _tokenizer_mismatch(p: str, s: dict, tokenizer, mine: set, where: str) -> Optional[str]:
    """Why dataset `p` (summary `s`) was not tokenized with `tokenizer`, else None. The
    identity is the content hash prepare-data records (sha256.tokenizer: the tokenizer.json,
    or a folder's tokenizer files; sha256.tokenizer_model: its tokenizer.json /
    tokenizer.model), then the size and the EOD id. `mine`: `tokenizer`'s hashes."""
    vocab, eod = s["vocab_size"], s.get("eod", tokenizer.eod)
    rec = _recorded_hashes(s)
    recorded = {rec[k] for k in ("tokenizer", "tokenizer_model") if k in rec}
    same_file = bool(recorded & mine)
    same_size = vocab == tokenizer.vocab_size
    if same_size and eod == tokenizer.eod and (same_file or not recorded):
        return None
    theirs = s.get("tokenizer") or "another tokenizer"
    if same_file and same_size:  # the same tokenizer, another end-of-document token
        name = tokenizer.inv_vocab.get(eod)
        return (f"dataset {p} was tokenized with {theirs} ending documents with EOD id {eod} "
                f"({name!r}), but data.tokenizer={str(tokenizer.path)!r} gives EOD {tokenizer.eod} "
                f"({tokenizer.inv_vocab.get(tokenizer.eod)!r}); set data.eod_token={name!r}")
    h = rec.get("tokenizer")
    if s.get("tokenizer") and Path(theirs).resolve() == tokenizer.path.resolve():  # changed in place
        return (f"dataset {p} was tokenized with {theirs} when it had sha256 {h[:12] if h else '?'} "
                f"({vocab} tokens, EOD {s.get('eod')}); it now has sha256 {tokenizer.sha256[:12]} "
                f"({tokenizer.vocab_size} tokens, EOD {tokenizer.eod}): the tokenizer changed since "
                f"prepare-data; re-run prepare-data with tokenizer={theirs} (output_dir="
                f"{Path(p).parent})")
    return (f"dataset {p} was tokenized with {theirs} (sha256 {h[:12] if h else '?'}, {vocab} "
            f"tokens, EOD {s.get('eod')}), not with data.tokenizer={str(tokenizer.path)!r} (sha256 "
            f"{tokenizer.sha256[:12]}, {tokenizer.vocab_size} tokens, EOD {tokenizer.eod}); point "
            f"data.tokenizer at {theirs}, or re-run prepare-data with tokenizer={tokenizer.path} "
            f"(and a new output_dir) and point {where} at its output")


def check_prefixes(spec: Any, tokenizer=None, model_vocab_size: Optional[int] = None,
                   where: str = "data.prefix", log: Optional[Callable[[str], None]] = None) -> dict:
    """Fail before any model is built if a dataset of the blend is missing, was tokenized
    with another tokenizer than `tokenizer` (its prepare-data summary.json records the
    tokenizer's content hash, size and EOD id), or holds ids the model's vocabulary lacks.
    Every prefix of a blend is checked. A summary.json without a tokenizer hash (not
    written by prepare-data) is accepted when size and EOD agree, with a warning line
    (`log`; default: print on rank 0). Returns the summary.json of a single prefix ({}
    when absent; for a blend {"blend": [summaries]})."""
    require_files(spec, where)
    summaries = []
    mine = None if tokenizer is None else {tokenizer.sha256, tokenizer_model_sha256(tokenizer)}
    for p in all_prefixes(spec):
        sp = Path(p).parent / "summary.json"
        try:
            s = json.loads(sp.read_text()) if sp.is_file() else {}
        except (OSError, json.JSONDecodeError):
            s = {}
        if not isinstance(s, dict) or (s.get("prefix") and Path(str(s["prefix"])).name != Path(p).name):
            s = {}  # a summary of another dataset in the same folder
        vocab = s.get("vocab_size")
        if vocab is not None and model_vocab_size is not None and vocab > model_vocab_size:
            raise DataError(
                f"dataset {p} was tokenized with a {vocab}-token vocabulary ({s.get('tokenizer')}) "
                f"but model.vocab_size={model_vocab_size}: its ids would index past the embedding. "
                f"Use a model with vocab_size >= {vocab} or re-run prepare-data with the model's "
                "tokenizer")
        if tokenizer is not None and vocab is not None:  # a prepare-data summary
            why = _tokenizer_mismatch(p, s, tokenizer, mine, where)
            if why:
                raise DataError(why)
            if "tokenizer" not in _recorded_hashes(s):
                msg = (f"[data] warning: {sp} records no tokenizer hash (sha256.tokenizer, which "
                       f"prepare-data writes), so only the size ({vocab} tokens) and EOD id of "
                       f"data.tokenizer={str(tokenizer.path)!r} could be checked; re-run "
                       "prepare-data for this data to record it")
                if log is not None:
                    log(msg)
                elif _rank0():
                    print(msg, flush=True)
        summaries.append(s)
    return summaries[0] if len(summaries) == 1 else {"blend": summaries}


def check_data(data: Any, model_vocab_size: Optional[int] = None,
               log: Optional[Callable[[str], None]] = None) -> dict:
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
    return check_prefixes(data.prefix, tok, model_vocab_size, log=log)


def default_cache_dir(spec: Any) -> Path:
    return Path(all_prefixes(spec)[0]).parent / "cache"


def prefix_label(spec: Union[str, list, dict]) -> str:
    return spec if isinstance(spec, str) else json.dumps(spec)
