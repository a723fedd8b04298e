"""Reading a text corpus into documents."""

from __future__ import annotations

from pathlib import Path
from typing import Union

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
