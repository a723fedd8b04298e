"""Reading a corpus into documents: .txt (paragraphs), JSON Lines (.jsonl/.jsonl.gz, one
document per line), Parquet; a file, a folder or a glob; streamed."""

from __future__ import annotations

import glob as _glob
import gzip
import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from .common import DataError


def read_corpus(corpus: Union[str, Path]) -> str:
    """The corpus as text with '\\n' line ends (a UTF-8 BOM and '\\r\\n' are normalised)."""
    path = Path(corpus)
    if not path.is_file():
        raise DataError(f"corpus {path} does not exist; give a UTF-8 .txt file (data.corpus=...)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"corpus {path} is not UTF-8 text ({err}); convert it to UTF-8") from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_documents(text: str, doc_sep: str = "\n\n") -> list[str]:
    """Paragraphs separated by `doc_sep`, newline-trimmed; blank ones dropped."""
    docs = (d.strip("\n") for d in text.split(doc_sep))
    return [d for d in docs if d.strip()]


# ----------------------------------------------------------------------------- streamed corpora

# Suffixes read as corpus files; a folder contributes every file with one of them.
CORPUS_SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def _kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith(".txt"):
        return "txt"
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def corpus_files(spec: Union[str, Path, Sequence[Union[str, Path]]]) -> list[Path]:
    """The files of a corpus: a file, a folder (its .txt/.jsonl[.gz]/.parquet files, searched
    recursively), a glob pattern, or a list of those; sorted by path within each entry, in
    the given order across entries. The order fixes the document order of the output."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for s in specs:
        s = str(s)
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not found:
                raise DataError(f"corpus folder {s} has no {'/'.join(CORPUS_SUFFIXES)} files")
        elif p.is_file():
            found = [p]
        elif any(c in s for c in "*?["):
            found = sorted(Path(f) for f in _glob.glob(s, recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"corpus pattern {s!r} matches no files")
        else:
            raise DataError(f"corpus={s!r} does not exist; give a file, a folder or a glob of "
                            f"{'/'.join(CORPUS_SUFFIXES)} files")
        for f in found:
            if _kind(f) is None:
                raise DataError(f"corpus file {f}: unknown format; use {'/'.join(CORPUS_SUFFIXES)}")
        out += found
    return out


def _txt_documents(path: Path, doc_sep: str, progress: Callable[[int], None]) -> Iterator[str]:
    """Paragraphs of a UTF-8 text file, read line by line: the same documents as
    split_documents(read_corpus(path)) for the default doc_sep of a blank line."""
    if doc_sep != "\n\n":
        yield from split_documents(read_corpus(path), doc_sep)
        progress(path.stat().st_size)
        return
    lines: list[str] = []
    with open(path, "rb") as f:
        first = True
        for raw in f:
            progress(len(raw))
            try:
                line = raw.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"corpus {path} is not UTF-8 text ({err}); convert it to UTF-8") from None
            first = False
            # universal newlines, as read_corpus: '\r\n' and lone '\r' end lines too
            line = line.replace("\r\n", "\n").replace("\r", "\n")
            for part in (line[:-1] if line.endswith("\n") else line).split("\n"):
                if part == "":
                    if lines:
                        doc = "\n".join(lines)
                        lines = []
                        if doc.strip():
                            yield doc
                else:
                    lines.append(part)
    if lines:
        doc = "\n".join(lines)
        if doc.strip():
            yield doc


def _jsonl_documents(path: Path, text_key: str, progress: Callable[[int], None]):
    """One document per JSON line: the `text_key` value (a string, or a list of strings
    that megatron's preprocess_data tokenizes one by one and concatenates). Blank lines are
    skipped."""
    gz = path.name.lower().endswith(".gz")
    raw = open(path, "rb")
    f = gzip.GzipFile(fileobj=raw) if gz else raw
    pos = 0
    try:
        for n, line in enumerate(f, start=1):
            if gz:
                now = raw.tell()
                progress(now - pos)
                pos = now
            else:
                progress(len(line))
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}:{n} is not a JSON object ({err}); give one JSON object "
                                "per line (JSON Lines)") from None
            if not isinstance(obj, dict) or text_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{n} has no key {text_key!r} (it has {keys}); set "
                                "text_key=<the key of the text field>")
            text = obj[text_key]
            if isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text)):
                yield text
            else:
                raise DataError(f"{path}:{n}: {text_key!r} is a {type(text).__name__}, not text")
    except (OSError, EOFError) as err:
        raise DataError(f"corpus file {path} cannot be read ({err})") from None
    finally:
        f.close()
        raw.close()


def _parquet_documents(path: Path, text_key: str, progress: Callable[[int], None]):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as err:
        raise DataError(f"{path} is not a readable Parquet file ({err})") from None
    if text_key not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_key!r} (it has {pf.schema_arrow.names}); "
                        "set text_key=<the text column>")
    size, groups = path.stat().st_size, max(pf.num_row_groups, 1)
    for g in range(pf.num_row_groups):
        for batch in pf.iter_batches(columns=[text_key], row_groups=[g], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{path}: column {text_key!r} holds {type(text).__name__}, not text")
                yield text
        progress(size // groups)


def iter_documents(files: Sequence[Path], text_key: str = "text", doc_sep: str = "\n\n",
                   progress: Optional[Callable[[int], None]] = None) -> Iterator[Union[str, list]]:
    """Documents of `files` in order, streamed (one line / row group in memory at a time).
    `progress(n)` is called with the number of input bytes consumed."""
    progress = progress or (lambda n: None)
    for f in files:
        kind = _kind(f)
        if kind == "txt":
            yield from _txt_documents(f, doc_sep, progress)
        elif kind == "jsonl":
            yield from _jsonl_documents(f, text_key, progress)
        else:
            yield from _parquet_documents(f, text_key, progress)
