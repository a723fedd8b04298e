"""The stats stage's depth KL is memory-bounded: with token chunking its peak host memory
stays at a few chunk x vocab buffers instead of growing with tokens x vocab (measured in
a fresh process, ru_maxrss), and the KL values are the same."""

import json
from pathlib import Path

from tests.conftest import launch

WORKER = Path(__file__).resolve().parents[1] / "dist" / "depth_memory_worker.py"


def test_depth_kl_peak_memory_is_bounded_by_the_chunk(tmp_path):
    out = tmp_path / "mem.json"
    vocab, b, s, chunk = 65536, 2, 256, 64
    launch(WORKER, [out, vocab, b, s, chunk])
    r = json.loads(out.read_text())
    chunk_mib = chunk * vocab * 4 / 2**20  # one fp32 [chunk, vocab] buffer: 16 MiB
    print(f"depth KL peak: unchunked {r['unchunked_mib']:.0f} MiB, chunked ({chunk} tokens) "
          f"{r['chunked_mib']:.0f} MiB; one micro-batch of fp32 logits = {r['logits_mib']:.0f} MiB")
    # unchunked: two logits + three fp32 temporaries of the whole micro-batch (observed
    # 548 MiB = 4.3 x 128 MiB); chunked: about 4-5 chunk buffers (observed 68 MiB)
    assert r["unchunked_mib"] > 3 * r["logits_mib"]
    assert r["chunked_mib"] < 6 * chunk_mib
    assert r["chunked_mib"] < 0.25 * r["unchunked_mib"]
    for a, c in zip(r["kl_chunked"], r["kl_unchunked"]):
        assert abs(a - c) <= 1e-5 * abs(c) + 1e-9
