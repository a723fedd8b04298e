"""prepare-data with real corpus formats and an existing tokenizer; blends.

Oracles: megatron-core's own HuggingFaceTokenizer + IndexedDatasetBuilder driven the way
Megatron-LM's tools/preprocess_data.py drives them (one JSON line = one document,
tokenize, append EOD, add_document; shards merged with add_index), and sample counting by
content for blend proportions.
"""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc

import numpy as np
import pytest

from megatron_minitron import data as D
from tests.real_tokenizer import english_paragraphs, make_tokenizer_folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_folder(tmp_path_factory.mktemp("tok") / "tokenizer")


def _docs(n: int, seed: int) -> list:
    """n documents made of real sentences; some empty, some megatron-style sentence lists."""
    rng = random.Random(seed)
    paras = english_paragraphs()
    out = []
    for i in range(n):
        if i % 17 == 5:
            out.append("")  # preprocess_data writes an empty document (no EOD, no sequence)
        elif i % 13 == 3:
            out.append([rng.choice(paras), " " + rng.choice(paras)])
        else:
            out.append(" ".join(rng.choice(paras) for _ in range(rng.randint(1, 3))))
    return out


def _write_shards(root, n_shards=3, per_shard=40, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(n_shards):
        docs = _docs(per_shard, seed + s)
        lines = "".join(json.dumps({"id": f"{s}-{i}", "text": d}) + "\n" for i, d in enumerate(docs))
        if s == n_shards - 1:
            path = root / f"shard_{s:02d}.jsonl.gz"
            path.write_bytes(gzip.compress(lines.encode()))
        else:
            path = root / f"shard_{s:02d}.jsonl"
            path.write_text(lines + ("\n" if s == 0 else ""))  # a trailing blank line is skipped
        shards.append((path, docs))
    return shards


def _preprocess_data_oracle(shards, tok_dir, prefix):
    """What tools/preprocess_data.py --append-eod writes per shard, merged with add_index."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

    mtok = HuggingFaceTokenizer(str(tok_dir), use_fast=True)
    eod = mtok.tokens_to_ids([mtok.tokenizer.eos_token])[0]
    dtype = DType.optimal_dtype(mtok.vocab_size)
    parts = []
    for n, (path, docs) in enumerate(shards):
        part = f"{prefix}_{n}"
        b = IndexedDatasetBuilder(part + ".bin", dtype=dtype)
        for text in docs:  # Encoder.encode
            sentences = text if isinstance(text, list) else [text]
            ids, lens = [], []
            for s in sentences:
                s_ids = mtok.text_to_ids(s)
                if s_ids:
                    ids += s_ids
                    lens.append(len(s_ids))
            if ids:
                ids.append(eod)
                lens[-1] += 1
            b.add_document(np.array(ids, dtype=dtype), lens)
        b.finalize(part + ".idx")
        parts.append(part)
    merged = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for part in parts:
        merged.add_index(part)
    merged.finalize(prefix + ".idx")
    return prefix


def test_jsonl_shards_identical_to_preprocess_data(tok_dir, tmp_path):
    shards = _write_shards(tmp_path / "corpus")
    ref = _preprocess_data_oracle(shards, tok_dir, str(tmp_path / "ref"))
    ref_bin, ref_idx = (tmp_path / "ref.bin").read_bytes(), (tmp_path / "ref.idx").read_bytes()
    for workers, corpus in ((1, str(tmp_path / "corpus")), (2, str(tmp_path / "corpus" / "shard_*.json*"))):
        out = tmp_path / f"ours{workers}"
        s = D.prepare_data(D.DataPrepConfig(output_dir=str(out), corpus=corpus, tokenizer=str(tok_dir),
                                            workers=workers, progress=False), log=lambda m: None)
        prefix = out / D.DATASET_NAME
        assert (prefix.with_suffix(".bin")).read_bytes() == ref_bin, f"workers={workers}"
        assert (prefix.with_suffix(".idx")).read_bytes() == ref_idx, f"workers={workers}"
        assert s["documents"] == sum(len(d) for _, d in shards) and s["workers"] == workers
        assert s["corpus_files"] == 3 and s["eod"] == D.Tokenizer(tok_dir).vocab["</s>"]
    ds = D.read_indexed_dataset(ref)
    n_empty = sum(1 for _, docs in shards for d in docs if d == "")
    assert ds.document_indices.size - 1 == s["documents"]
    assert int((np.diff(ds.document_indices) == 0).sum()) == n_empty > 0  # no sequence for ""
    n_lists = sum(1 for _, docs in shards for d in docs if isinstance(d, list))
    assert len(ds) == s["documents"] - n_empty + n_lists  # a 2-sentence list: 2 sequences


def test_parquet_txt_and_text_key(tok_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [d for d in _docs(30, 7) if isinstance(d, str)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), tmp_path / "a.parquet",
                   row_group_size=7)
    sums = {}
    for name in ("a.jsonl", "a.parquet"):
        out = tmp_path / name.replace(".", "_")
        D.prepare_data(D.DataPrepConfig(output_dir=str(out), corpus=str(tmp_path / name),
                                        tokenizer=str(tok_dir / "tokenizer.json"), text_key="body",
                                        workers=1, progress=False), log=lambda m: None)
        sums[name] = D.sha256_file(out / f"{D.DATASET_NAME}.bin"), D.sha256_file(out / f"{D.DATASET_NAME}.idx")
    assert sums["a.jsonl"] == sums["a.parquet"]
    with pytest.raises(D.DataError, match="no key 'text'.*text_key"):
        D.prepare_data(D.DataPrepConfig(output_dir=str(tmp_path / "x"), corpus=str(tmp_path / "a.jsonl"),
                                        tokenizer=str(tok_dir), progress=False), log=lambda m: None)
    with pytest.raises(D.DataError, match="no column 'text'"):
        D.prepare_data(D.DataPrepConfig(output_dir=str(tmp_path / "x"), corpus=str(tmp_path / "a.parquet"),
                                        tokenizer=str(tok_dir), progress=False), log=lambda m: None)


def test_existing_tokenizer_rules(tok_dir, tmp_path):
    tok = D.Tokenizer(tok_dir)
    assert D.EOD_TOKEN not in tok.vocab and "<pad>" not in tok.vocab
    assert tok.eod == tok.vocab["</s>"] and tok.pad == -1  # no pad token: megatron's "none"
    assert D.Tokenizer(tok_dir, eod_token="<s>").eod == tok.vocab["<s>"]
    with pytest.raises(D.DataError, match="eod_token='<eot>' is not in the vocabulary"):
        D.Tokenizer(tok_dir, eod_token="<eot>")
    bare = tmp_path / "bare" / "tokenizer.json"  # a tokenizer.json alone names no eos
    bare.parent.mkdir()
    bare.write_bytes((tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(D.DataError, match="names no end-of-document token.*eod_token="):
        D.Tokenizer(bare)
    assert D.Tokenizer(bare, "</s>").eod == tok.eod
    (tmp_path / "c.txt").write_text("Beautiful is better than ugly.\n\nFlat is better than nested.\n")
    s = D.prepare_data(D.DataPrepConfig(output_dir=str(tmp_path / "o"), corpus=str(tmp_path / "c.txt"),
                                        tokenizer=str(tok_dir), vocab_size=4096, progress=False),
                       log=lambda m: None)  # a recipe's BPE size: not used with a tokenizer
    assert s["vocab_size_not_used"] == 4096 and s["vocab_size"] == 384
    s = D.prepare_data(D.DataPrepConfig(output_dir=str(tmp_path / "o"), corpus=str(tmp_path / "c.txt"),
                                        tokenizer=str(tok_dir), progress=False), log=lambda m: None)
    ds = D.read_indexed_dataset(s["prefix"])
    assert ds[0].tolist() == tok.tokenize("Beautiful is better than ugly.") + [tok.eod]
    assert s["vocab_size"] == 384 and s["dtype"] == "uint16"

    class Data:  # a DataConfig
        prefix, tokenizer, eod_token = s["prefix"], str(tok_dir), ""

    assert D.check_data(Data, 384)["tokens"] == s["tokens"]
    with pytest.raises(D.DataError, match="384 tokens but model.vocab_size=256"):
        D.check_data(Data, 256)
    with pytest.raises(D.DataError, match="384-token vocabulary.*model.vocab_size=256"):
        D.check_prefixes(s["prefix"], None, 256)
    other = tmp_path / "other"
    D.prepare_data(D.DataPrepConfig(output_dir=str(other), corpus=str(tmp_path / "c.txt"), vocab_size=300,
                                    progress=False), log=lambda m: None)
    Data.tokenizer = str(other / "tokenizer.json")
    with pytest.raises(D.DataError, match="not with data.tokenizer"):
        D.check_data(Data, 4096)


def test_streaming_memory_is_flat(tok_dir, tmp_path):
    """Peak Python memory of write_indexed_dataset does not grow with the corpus."""
    tok = D.Tokenizer(tok_dir)
    peaks = {}
    for n in (2000, 8000):
        path = tmp_path / f"c{n}.jsonl"
        with open(path, "w") as f:
            for d in _docs(n, n):
                f.write(json.dumps({"text": d}) + "\n")
        tracemalloc.start()
        stats = D.write_indexed_dataset(path, tok, tmp_path / f"o{n}" / "p", workers=1)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats["documents"] == n
    assert peaks[8000] < 1.3 * peaks[2000] + (1 << 20), peaks


# ----------------------------------------------------------------------------- blends


def _alphabet_dataset(root, tok, name, alphabet, n_docs, seed):
    """Documents of random characters of `alphabet` (no spaces): its token ids tell its
    samples apart from another alphabet's."""
    rng = random.Random(seed)
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 60)))})
                            + "\n" for _ in range(n_docs)))
    D.write_indexed_dataset(path, tok, root / name / "p", workers=1)
    prefix = str(root / name / "p")
    return prefix, set(np.fromfile(prefix + ".bin", dtype=np.uint16).tolist()) - {tok.eod}


def test_blend_proportions(tok_dir, tmp_path):
    tok = D.Tokenizer(tok_dir)
    a, ids_a = _alphabet_dataset(tmp_path, tok, "letters", "abcdefghijklmnopqrstuvwxyz", 300, 1)
    b, ids_b = _alphabet_dataset(tmp_path, tok, "digits", "0123456789", 200, 2)
    assert ids_a and ids_b and not ids_a & ids_b
    n = 4000
    train, valid, _ = D.build_gpt_datasets([0.3, a, 0.7, b], tok, 8, "90,10,0",
                                           {"train": n, "valid": 200}, 1234, tmp_path / "cache")
    assert type(train).__name__ == "BlendedDataset" and len(train) == n

    def source(sample):
        t = set(sample["tokens"].tolist() + sample["labels"].tolist())
        return "a" if t & ids_a and not t & ids_b else "b" if t & ids_b and not t & ids_a else "?"

    counts = {"a": 0, "b": 0, "?": 0}
    for i in range(n):
        counts[source(train[i])] += 1
    known = counts["a"] + counts["b"]
    assert counts["?"] == 0, counts
    frac_a = counts["a"] / known
    print(f"blend 0.3/0.7: sampled {frac_a:.4f} / {1 - frac_a:.4f} of {known} samples")
    assert abs(frac_a - 0.3) < 0.02 and abs((1 - frac_a) - 0.7) < 0.02
    # unweighted list = weighted by size; per-split blends; one epoch of a weighted blend
    t2, _, _ = D.build_gpt_datasets([a, b], tok, 8, "100,0,0", {"train": 50}, 1, tmp_path / "cache")
    assert len(t2) == 50
    t3, v3, te3 = D.build_gpt_datasets({"train": [1, a, 1, b], "valid": b}, tok, 8, "1,1,1",
                                       {"train": 40, "valid": 5}, 1, tmp_path / "cache")
    assert len(t3) == 40 and te3 is None
    assert all(source(v3[i]) == "b" for i in range(len(v3)))
    t4, _, _ = D.build_gpt_datasets([0.5, a, 0.5, b], tok, 8, "100,0,0", {"train": None}, 1, tmp_path / "cache")
    tokens = sum(np.fromfile(p + ".bin", dtype=np.uint16).size for p in (a, b))
    assert len(t4) == tokens // 8


@pytest.mark.parametrize("spec,match", [
    ([0.3, "a", 0.7], "odd length"),
    (["x", "a", 0.7, "b"], "not a weight"),
    ([0, "a", 0, "b"], "sum to 0"),
    ([-1, "a", 2, "b"], "finite and >= 0"),
    ({"train": "a", "dev": "b"}, "unknown split"),
    ("", "empty"),
])
def test_blend_forms_refused(spec, match):
    with pytest.raises(D.DataError, match=match):
        D.parse_blend(spec)


def test_data_config_accepts_blends(tmp_path):
    from megatron_minitron.config import ConfigError, DataConfig, build

    cfg = build(DataConfig, {"prefix": [0.3, "a", 0.7, "b"]}, "data.")
    cfg.validate()
    build(DataConfig, {"prefix": {"train": ["a", "b"], "valid": "c"}}, "data.").validate()
    with pytest.raises(ConfigError, match="data.prefix"):
        build(DataConfig, {"prefix": [0.3, "a", 0.7]}, "data.").validate()


def test_sentencepiece_folder_identical_to_preprocess_data(tmp_path):
    """A SentencePiece tokenizer.model folder (Llama-style, no tokenizer.json), loaded by
    transformers' AutoTokenizer, gives preprocess_data's bytes too."""
    spm = pytest.importorskip("sentencepiece")
    tok_dir = tmp_path / "sp"
    tok_dir.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(english_paragraphs()), model_prefix=str(tok_dir / "tokenizer"),
                                   vocab_size=300, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "legacy": False}))
    tok = D.Tokenizer(tok_dir)
    assert tok.eod == 2 and not (tok_dir / "tokenizer.json").exists()
    text = "Beautiful is better than ugly."
    assert tok.detokenize(tok.tokenize(text)) == text and tok.tokenize(text)[0] != 1  # no BOS
    shards = _write_shards(tmp_path / "corpus", n_shards=2, per_shard=25, seed=3)
    _preprocess_data_oracle(shards, tok_dir, str(tmp_path / "ref"))
    s = D.prepare_data(D.DataPrepConfig(output_dir=str(tmp_path / "o"), corpus=str(tmp_path / "corpus"),
                                        tokenizer=str(tok_dir), workers=1, progress=False), log=lambda m: None)
    assert D.sha256_file(tmp_path / "ref.bin") == s["sha256"]["bin"]
    assert D.sha256_file(tmp_path / "ref.idx") == s["sha256"]["idx"]


def test_stages_read_blends(tok_dir, tmp_path):
    """The stages' data entry points (data.stage_data.check_data / datasets, used by pretrain,
    eval, stats, distill and search) take a blend and build megatron's BlendedDataset."""
    from megatron_minitron.config import DataConfig, ModelConfig
    from megatron_minitron.data.stage_data import check_data, datasets

    tok = D.Tokenizer(tok_dir)
    a, ids_a = _alphabet_dataset(tmp_path, tok, "letters", "abcdefghijklmnopqrstuvwxyz", 120, 3)
    b, ids_b = _alphabet_dataset(tmp_path, tok, "digits", "0123456789", 120, 4)
    cfg = DataConfig(prefix=[0.25, a, 0.75, b], tokenizer=str(tok_dir), split="90,10,0")
    cfg.validate()
    assert [len(s) for s in check_data(cfg, ModelConfig(vocab_size=384))["blend"]] == [0, 0]
    train, valid, test = datasets(cfg, 8, 400, 20)
    assert type(train).__name__ == "BlendedDataset" and len(train) == 400 and test is None
    n_a = sum(1 for i in range(len(train)) if set(train[i]["tokens"].tolist()) & ids_a)
    assert abs(n_a / 400 - 0.25) < 0.02
    with pytest.raises(D.DataError, match="384 tokens but model.vocab_size=300"):
        check_data(cfg, ModelConfig(vocab_size=300))
