"""Stage losses with a real loss_mask, against hand computations (tests/dist/test_mask_dist.py).

One launch, 2 processes:
  * a corpus of real documents each followed by a run of <pad> tokens (as padded SFT data
    is stored): megatron's GPTDataset sets loss_mask = 0 wherever the label is <pad>, so
    every batch below has masked tokens (checked);
  * a teacher and a smaller student (random, every 1-D weight perturbed), saved at TP=2;
  * the stages at TP=2 (vocab-parallel CE / KL): `eval` of the teacher; `distill` with
    alpha_kd = 1, 0 and 0.3 (step 1's reported loss / kd / ce, computed before the first
    update; teacher_val_loss and student_val_before);
  * the hand computation: both models re-built at TP=1 and loaded, full-vocab logits of the
    same samples (the datasets built with the stages' own arguments), per-token CE and
    KL(p_t || p_s) in float64 from log_softmax, mean over loss_mask == 1 tokens only.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from megatron_minitron import dist as D
from megatron_minitron.config import DataConfig, EvalConfig, ModelConfig, ParallelConfig, TrainConfig

TEACHER = ModelConfig(pattern="M-*-", hidden_size=48, ffn_hidden_size=64, mamba_num_heads=4,
                      mamba_head_dim=12, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                      num_attention_heads=4, num_query_groups=2, kv_channels=12, vocab_size=4096,
                      seq_length=48)
STUDENT = replace(TEACHER, pattern="M*-", hidden_size=32, ffn_hidden_size=32, mamba_num_heads=2)
TRAIN = TrainConfig(steps=2, global_batch_size=4, micro_batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                    eval_interval=100, eval_iters=2, save_interval=100, log_interval=1)
ALPHAS = (1.0, 0.0, 0.3)


def padded_corpus(wd: Path) -> DataConfig:
    """Real documents (the first 20-60 tokens of each) + 4-24 <pad> tokens each."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_minitron.data import Tokenizer

    info = json.loads((wd / "data.json").read_text())
    pad = Tokenizer(info["tokenizer"]).pad
    src = IndexedDataset(info["prefix"])
    g = np.random.default_rng(0)
    b = IndexedDatasetBuilder(str(wd / "padded.bin"), dtype=src[0].dtype.type)
    for i in range(min(len(src), 600)):
        doc = src[i][: int(g.integers(20, 60))]
        doc = np.concatenate([doc, np.full(int(g.integers(4, 25)), pad, dtype=doc.dtype)])
        b.add_document(doc, [len(doc)])
    b.finalize(str(wd / "padded.idx"))
    return DataConfig(prefix=str(wd / "padded"), tokenizer=info["tokenizer"], split="90,10,0")


def make(cfg: ModelConfig, par, seed: int, path: Path):
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    m = build_model(cfg, par)
    g = torch.Generator().manual_seed(seed)  # the same stream on both TP ranks
    with torch.no_grad():
        for prm in m.parameters():
            if prm.dim() == 1:
                prm.add_(0.2 * torch.randn(prm.shape, generator=g))
            else:
                prm.mul_(4.0)  # peaked distributions: KL and CE far from their init values
    ckpt.save(path, 0, cfg, {"model": m.sharded_state_dict()}, {"kind": "mask-test"})


def hand(wd: Path, data: DataConfig, res: dict):
    """TP=1 models, full-vocab logits, float64 losses over loss_mask == 1 only."""
    from megatron_minitron.model import build_model
    from megatron_minitron.rewrite.stage import forward_logits
    from megatron_minitron.train import checkpoint as ckpt
    from megatron_minitron.data.stage_data import datasets

    par = D.init(ParallelConfig(), seed=1)  # world 2 at TP=1: each rank computes the same
    models = {}
    for name, cfg in (("teacher", TEACHER), ("student", STUDENT)):
        models[name] = build_model(cfg, par)
        ckpt.load_model_weights(wd / name, models[name])

    def logp(name, batch):
        return torch.log_softmax(forward_logits(models[name], par, batch["tokens"]).double(), -1)

    def stack(ds, idx):
        from megatron_minitron.train.engine import collate

        return collate([ds[i] for i in idx])

    seq = TEACHER.seq_length
    # eval: datasets(data, seq, 1, n) and the first n valid samples
    n = TRAIN.eval_iters * TRAIN.micro_batch_size
    _, valid, _ = datasets(data, seq, 1, n)
    vb = stack(valid, range(n))
    # distill: datasets(data, seq, steps*gbs, eval_iters*mbs*dp); step 1 = train samples [0, gbs)
    train, valid_d, _ = datasets(data, seq, TRAIN.steps * TRAIN.global_batch_size, n)
    tb = stack(train, range(TRAIN.global_batch_size))
    vdb = stack(valid_d, range(n))

    def ce(name, b):
        lp = logp(name, b)
        tok = -lp.gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1)
        m = b["loss_mask"].double()
        return float((tok * m).sum() / m.sum()), float(tok.mean())

    def kd(b):
        lt, ls = logp("teacher", b), logp("student", b)
        tok = (lt.exp() * (lt - ls)).sum(-1)
        m = b["loss_mask"].double()
        return float((tok * m).sum() / m.sum()), float(tok.mean())

    res["hand"] = {
        "eval_teacher_ce": ce("teacher", vb),
        "distill_teacher_val": ce("teacher", vdb),
        "distill_student_val": ce("student", vdb),
        "step1_kd": kd(tb),
        "step1_ce": ce("student", tb),
    }
    res["masked_fraction"] = {k: float(1 - b["loss_mask"].mean()) for k, b in
                              (("eval", vb), ("train", tb), ("distill_valid", vdb))}
    # the mask is the pad positions (megatron rewrites <pad> labels to 0 but keeps the mask)
    res["mask_zero_labels_are_zero"] = bool((tb["labels"][tb["loss_mask"] == 0] == 0).all())


def run(wd: Path):
    import torch.distributed as dist

    from megatron_minitron.distill.stage import DistillConfig, LossConfig, run_distill
    from megatron_minitron.train.pretrain import run_eval

    par = D.init(ParallelConfig(tp=2), seed=3)
    if dist.get_rank() == 0:
        data = padded_corpus(wd)
    dist.barrier()
    data = DataConfig(prefix=str(wd / "padded"), tokenizer=json.loads((wd / "data.json").read_text())["tokenizer"],
                      split="90,10,0")
    make(TEACHER, par, 1, wd / "teacher")
    make(STUDENT, par, 2, wd / "student")
    shutdown, D.shutdown = D.shutdown, lambda: None  # stages end with D.shutdown(): keep one group
    res = {"eval": run_eval(EvalConfig(checkpoint=str(wd / "teacher"), output_dir=str(wd / "eval"), data=data,
                                       parallel=ParallelConfig(tp=2), eval_iters=TRAIN.eval_iters,
                                       micro_batch_size=TRAIN.micro_batch_size))["loss"]}
    for a in ALPHAS:
        s = run_distill(DistillConfig(student=str(wd / "student"), teacher=str(wd / "teacher"),
                                      output_dir=str(wd / f"distill_{a}"), data=data, train=TRAIN,
                                      parallel=ParallelConfig(tp=2),
                                      loss=LossConfig(alpha_kd=a, chunk_size=40)))
        res[f"alpha_{a}"] = {"step1": s["history"][0], "teacher_val": s["teacher_val_loss"],
                             "student_val_before": s["student_val_before"]}
    hand(wd, data, res)
    D.shutdown = shutdown
    if dist.get_rank() == 0:
        (wd / "result_mask.json").write_text(json.dumps(res, indent=2))
    D.shutdown()


if __name__ == "__main__":
    run(Path(sys.argv[2]))
