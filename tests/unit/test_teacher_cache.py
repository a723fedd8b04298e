"""The cache's files (distill/cache.py) without a model: a shard written and read back in
both log-prob dtypes, its bytes against the documented layout (read here with numpy), and
the refusals of a damaged or unfinished cache."""

import json

import numpy as np
import pytest
import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.distill import cache as C


def _write(root, dtype, n=3, seq=5, k=4, samples=None):
    g = np.random.default_rng(0)
    arrays = {"ids": g.integers(0, 1000, (n, seq, k)), "logprobs": -g.random((n, seq, k)) * 20,
              "log_rest": -g.random((n, seq)), "hash": [C.token_hash(g.integers(0, 9, seq)) for _ in range(n)]}
    C.write_shard(root, 0, 0, arrays, C.Shard(n, seq, k, dtype))
    (root / C.MANIFEST).write_text(json.dumps({
        "version": C.VERSION, "complete": True, "samples": samples or n, "seq_length": seq, "top_k": k,
        "shard_samples": n, "logprob_dtype": dtype}))
    return arrays


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shard_round_trip_and_layout(tmp_path, dtype):
    a = _write(tmp_path, dtype)
    raw = (tmp_path / "shards" / "000000.bin").read_bytes()
    assert len(raw) == 3 * 5 * C.bytes_per_token(4, dtype) + 3 * 8
    lp_bytes = 2 if dtype == "float16" else 4
    ids = np.frombuffer(raw, "<i4", 60)
    lps = np.frombuffer(raw, "<f2" if dtype == "float16" else "<f4", 60, offset=240)
    assert np.array_equal(ids, a["ids"].reshape(-1))
    c = C.TeacherCache(tmp_path)
    got = c.get([2, 0])
    assert got["ids"].dtype == torch.int64 and got["logprobs"].dtype == torch.float32
    assert torch.equal(got["ids"][0], torch.as_tensor(a["ids"][2]))
    tol = 2e-2 if dtype == "float16" else 1e-6  # fp16: 11-bit mantissa at |log p| < 20
    assert np.abs(got["logprobs"].numpy()[1] - a["logprobs"][0]).max() < tol
    assert np.abs(lps.astype(np.float32)[:20] - got["logprobs"].numpy()[1].reshape(-1)).max() == 0
    assert got["hash"].tolist() == [a["hash"][2], a["hash"][0]]
    assert json.loads((tmp_path / "shards" / "000000.json").read_text())["samples"] == [0, 3]
    assert lp_bytes * 60 + 240 < len(raw)


def test_damaged_or_unfinished_cache_refused(tmp_path):
    _write(tmp_path, "float32")
    f = tmp_path / "shards" / "000000.bin"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(ConfigError, match="the cache is damaged"):
        C.TeacherCache(tmp_path).get([0])
    m = json.loads((tmp_path / C.MANIFEST).read_text())
    (tmp_path / C.MANIFEST).write_text(json.dumps(dict(m, complete=False)))
    with pytest.raises(ConfigError, match="not complete"):
        C.TeacherCache(tmp_path)
    with pytest.raises(ConfigError, match="no manifest.json"):
        C.TeacherCache(tmp_path / "nowhere")


def test_sample_outside_the_cache_refused(tmp_path):
    _write(tmp_path, "float32")
    with pytest.raises(ConfigError, match="sample 3 is not in"):
        C.TeacherCache(tmp_path).get([3])
