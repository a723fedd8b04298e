"""Layout-parity and resume checks for the foundation, in three launches:

  ref   (1 process):   TP1/PP1 reference: save C0; logits of C0; 4 training steps from C0;
                       resume equivalence (2 steps, save, 2 steps  vs  resume + 2 steps).
  par   (2 processes): for TP=2, PP=2, DP=2: load C0, logits, 4 training steps from C0;
                       at TP=2 also save the trained model (C2) and its logits; load C2 at
                       PP=2 and take logits again.
  check (1 process):   load C2 (written at TP=2) at TP=1; logits.

Each launch writes JSON / tensors into WORKDIR; tests/dist/test_foundation_dist.py compares.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_minitron import dist as D
from megatron_minitron.config import DataConfig, ParallelConfig, TrainConfig
from megatron_minitron.model import build_model
from megatron_minitron.train import checkpoint as ckpt
from megatron_minitron.train.engine import (MicroBatches, build_trainable, collate,
                                            reduce_reports, resume_trainable, save_trainable,
                                            train_step, lm_forward_step)
from megatron_minitron.data.stage_data import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist.tiny_teacher import TEACHER  # noqa: E402

MODEL = TEACHER  # the tiny hybrid the dist workers share
TRAIN = TrainConfig(steps=100, global_batch_size=4, micro_batch_size=1, lr=3e-3, min_lr=3e-4,
                    warmup_steps=2, clip_grad=1.0)
STEPS = 4


def data_cfg(workdir: Path) -> DataConfig:
    info = json.loads((workdir / "data.json").read_text())
    return DataConfig(prefix=info["prefix"], tokenizer=info["tokenizer"], split="90,10,0")


def full_logits(model, batch, par) -> torch.Tensor | None:
    """Logits [b, s, V] gathered over TP on the last stage; None elsewhere. Forward only,
    driven through the pipeline schedule so PP>1 works."""
    from megatron_minitron.compat import mcore

    got = []

    def step(it, m):
        b = next(it)
        from megatron_minitron.model import causal_mask
        out = m(b["tokens"], b["position_ids"], causal_mask(b["tokens"].shape[1]))
        def keep(o):
            got.append(o.detach())
            return o.sum() * 0, {"x": torch.zeros(2)}
        return out, keep

    model.eval()
    with torch.no_grad():
        mcore.get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=[model],
            num_microbatches=1, seq_length=batch["tokens"].shape[1],
            micro_batch_size=batch["tokens"].shape[0], forward_only=True)
    if not par.is_last_stage:
        return None
    local = got[0]
    if par.tp > 1:
        parts = [torch.empty_like(local) for _ in range(par.tp)]
        dist.all_gather(parts, local.contiguous(), group=par.pg.tp)
        local = torch.cat(parts, dim=-1)
    return local


def fixed_batch(valid_ds) -> dict:
    return collate([valid_ds[i] for i in range(2)])


def save_logits(t, path: Path, par) -> None:
    if t is not None and par.tp_rank == 0:
        torch.save(t, path)


def train_from(model_path, par, pc, train_ds, steps) -> list[float]:
    t = build_trainable(MODEL, par, TRAIN, pc)
    ckpt.load_model_weights(model_path, t.model)
    data = MicroBatches(train_ds, TRAIN.micro_batch_size, TRAIN.global_batch_size, par.dp, par.dp_rank)
    nm = TRAIN.global_batch_size // (TRAIN.micro_batch_size * par.dp)
    losses = []
    for _ in range(steps):
        r = train_step(t, data, lm_forward_step, nm, MODEL.seq_length, TRAIN.micro_batch_size)
        losses.append(reduce_reports(r["reports"], par))
    return losses, t


def main():
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    dcfg = data_cfg(workdir)
    out = {}
    if phase == "ref":
        pc = ParallelConfig()
        par = D.init(pc, seed=1234)
        train_ds, valid_ds, _ = datasets(dcfg, MODEL.seq_length, 400, 8)
        batch = fixed_batch(valid_ds)
        t0 = build_trainable(MODEL, par, TRAIN, pc)
        save_trainable(t0, workdir / "c0")
        save_logits(full_logits(t0.model.module, batch, par), workdir / "logits_c0_ref.pt", par)
        out["losses"], _ = train_from(workdir / "c0", par, pc, train_ds, STEPS)
        # resume equivalence: N=2 steps, save, M=2 more  vs  fresh process state + resume
        t = build_trainable(MODEL, par, TRAIN, pc)
        ckpt.load_model_weights(workdir / "c0", t.model)
        nm = TRAIN.global_batch_size // TRAIN.micro_batch_size
        data = MicroBatches(train_ds, 1, TRAIN.global_batch_size, 1, 0)
        cont = []
        for i in range(4):
            r = train_step(t, data, lm_forward_step, nm, MODEL.seq_length, 1)
            cont.append(reduce_reports(r["reports"], par))
            if i == 1:
                save_trainable(t, workdir / "resume")
        t2 = build_trainable(MODEL, par, TRAIN, pc)
        resume_trainable(t2, workdir / "resume")
        data2 = MicroBatches(train_ds, 1, TRAIN.global_batch_size, 1, 0, start_step=t2.iteration)
        resumed = []
        for _ in range(2):
            r = train_step(t2, data2, lm_forward_step, nm, MODEL.seq_length, 1)
            resumed.append(reduce_reports(r["reports"], par))
        out.update(uninterrupted=cont, resumed=resumed, resume_iteration=t2.iteration,
                   lr_cont=t.optimizer.param_groups[0]["lr"], lr_resumed=t2.optimizer.param_groups[0]["lr"])
    elif phase == "par":
        for name, pc in (("tp2", ParallelConfig(tp=2)), ("pp2", ParallelConfig(pp=2)),
                         ("dp2", ParallelConfig())):
            par = D.init(pc, seed=1234)
            train_ds, valid_ds, _ = datasets(dcfg, MODEL.seq_length, 400, 8)
            batch = fixed_batch(valid_ds)
            model = build_model(MODEL, par)
            ckpt.load_model_weights(workdir / "c0", model)
            save_logits(full_logits(model, batch, par), workdir / f"logits_c0_{name}.pt", par)
            losses, t = train_from(workdir / "c0", par, pc, train_ds, STEPS)
            out[name] = {"losses": losses, "dp": par.dp}
            if name == "tp2":
                save_trainable(t, workdir / "c2")
                save_logits(full_logits(t.model.module, batch, par), workdir / "logits_c2_tp2.pt", par)
                par_pp = D.init(ParallelConfig(pp=2), seed=1)
                m2 = build_model(MODEL, par_pp)
                ckpt.load_model_weights(workdir / "c2", m2)
                save_logits(full_logits(m2, batch, par_pp), workdir / "logits_c2_pp2.pt", par_pp)
            dist.barrier()
    elif phase == "check":
        par = D.init(ParallelConfig(), seed=1)
        _, valid_ds, _ = datasets(dcfg, MODEL.seq_length, 400, 8)
        model = build_model(MODEL, par)
        meta = ckpt.load_model_weights(workdir / "c2", model)
        out["c2_meta"] = meta
        save_logits(full_logits(model, fixed_batch(valid_ds), par), workdir / "logits_c2_tp1.pt", par)
    if D.is_rank0():
        (workdir / f"result_{phase}.json").write_text(json.dumps(out, indent=2))
    D.shutdown()


if __name__ == "__main__":
    main()
