"""Peak host memory of the depth-KL pass (importance/depth.py) with and without token
chunking, on a real megatron-core hybrid with a large vocabulary (world of one).

    python tests/dist/depth_memory_worker.py OUT.json [vocab] [batch] [seq] [chunk]

Peak = growth of the process's maximum resident set (ru_maxrss) over the pass, chunked
pass first (ru_maxrss only grows, so the unchunked pass's larger peak shows after it).
Writes {"chunked_mib", "unchunked_mib", "logits_mib", "kl_chunked", "kl_unchunked"}.
"""

import json
import resource
import sys

import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.importance.depth import accumulate_kl, hidden_out, pipeline_forward
from megatron_minitron.model import build_model


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main():
    out = sys.argv[1]
    vocab, b, s, chunk = (int(x) for x in (sys.argv[2:6] + ["65536", "2", "256", "64"][len(sys.argv[2:6]):]))
    cfg = ModelConfig(pattern="M-*", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=2,
                      mamba_head_dim=16, mamba_num_groups=1, mamba_state_dim=8,
                      mamba_chunk_size=32, num_attention_heads=2, num_query_groups=1,
                      kv_channels=16, vocab_size=vocab, seq_length=s)
    par = D.init(ParallelConfig(), seed=5)
    model = build_model(cfg, par).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, vocab, (b, s), generator=g),
             "position_ids": torch.arange(s)[None].expand(b, -1)}
    res = {"logits_mib": b * s * vocab * 4 / 2**20}
    with torch.no_grad():
        hid = []
        with hidden_out(model):
            pipeline_forward(model, batch, hid.append)
        for name, c in (("chunked", chunk), ("unchunked", 0)):
            kl = torch.zeros(cfg.num_layers, dtype=torch.float64)
            base = maxrss_mib()
            accumulate_kl(model, batch, hid[0], cfg.num_layers, 0, cfg.num_layers, True, None, kl,
                          chunk_tokens=c)
            res[f"{name}_mib"] = maxrss_mib() - base
            res[f"kl_{name}"] = kl.tolist()
    D.shutdown()
    with open(out, "w") as f:
        json.dump(res, f)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
