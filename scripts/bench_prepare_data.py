"""Tokenization throughput of prepare-data: a generated multi-shard JSON Lines corpus of real
English (stdlib module docs + the Zen of Python, recombined), tokenized with a Hugging Face
tokenizer folder, at several worker counts. Prints tokens/s and checks that every worker
count writes the same bytes.

    .venv/bin/python scripts/bench_prepare_data.py --mb 200 --workers 1 2 4 8

Needs an otherwise idle machine for meaningful figures (workers compete for cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokenizer", default="", help="a tokenizer.json or HF folder; default: a "
                    "4096-token byte-level BPE trained on the corpus's paragraphs")
    ap.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    args = ap.parse_args()

    from megatron_minitron import data as D
    from tests.real_tokenizer import english_paragraphs, make_tokenizer_folder

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_prepare_"))
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    paras = english_paragraphs()
    rng = random.Random(0)
    per_shard = int(args.mb * 1e6 / args.shards)
    for s in range(args.shards):
        path = corpus / f"shard-{s:03d}.jsonl"
        if path.is_file() and path.stat().st_size >= per_shard:
            continue
        with open(path, "w") as f:
            n = 0
            while n < per_shard:
                line = json.dumps({"text": " ".join(rng.choice(paras) for _ in range(rng.randint(2, 8)))}) + "\n"
                f.write(line)
                n += len(line)
    tok = args.tokenizer or str(make_tokenizer_folder(root / "tokenizer", vocab_size=4096))
    size = sum(p.stat().st_size for p in corpus.iterdir())
    print(f"corpus {size / 1e6:.1f} MB in {args.shards} shards; tokenizer {tok}; {os.cpu_count()} cpus")
    digests = {}
    for w in args.workers:
        out = root / f"out-w{w}"
        t = time.time()
        s = D.prepare_data(D.DataPrepConfig(output_dir=str(out), corpus=str(corpus), tokenizer=tok,
                                            workers=w, progress=False), log=lambda m: None)
        wall = time.time() - t
        digests[w] = s["sha256"]["bin"], s["sha256"]["idx"]
        print(f"workers={w}: {s['tokens']:,} tokens, {s['documents']:,} documents in {s['seconds']:.1f} s "
              f"(stage {wall:.1f} s): {s['tokens_per_s']:,.0f} tokens/s, {size / 1e6 / s['seconds']:.1f} MB/s")
        (out / f"{D.DATASET_NAME}.bin").unlink()  # keep the disk use flat between runs
    same = len(set(digests.values())) == 1
    print(f"identical outputs at every worker count: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
