"""The frozen teacher and the teacher+student pipeline step of the distill stage.

The teacher is built on the SAME (tp, pp) layout as the student (this rank holds its TP
shard of its PP stage), loaded from its checkpoint, put in eval mode, and every parameter
gets requires_grad=False: it never reaches the DDP grad buffers or the optimizer.

Pipeline parallelism: megatron's schedules send ONE tensor between stages, of shape
[s, b, config.hidden_size] (the student's config). We run both models stage by stage and
send their hidden states concatenated on the last dim, [s, b, h_s + h_t]; the receiving
stage splits it again. The schedule is told the wider p2p shape through
`adjust_tensor_shapes_fn` (megatron-core's non-interleaved 1F1B schedule). The teacher half
is computed under no_grad, so the backward pass only reaches the student half (its slice of
the received tensor's gradient is zero). On the last stage the forward returns the student's
logits; the teacher's logits ([b, s, V/tp], detached) go to the loss function.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Iterator, Optional

import torch

from ..config import ModelConfig
from ..model import build_model, causal_mask
from ..train import checkpoint as ckpt
from ..train import cp as cpsplit


def load_teacher(path: str, par, model_cfg: Optional[ModelConfig] = None, runtime=None):
    """Build this rank's stage of the teacher and load its checkpoint; frozen, eval mode.

    Returns (model, model_cfg, meta). Collective (every rank loads its shard)."""
    cfg = model_cfg if model_cfg is not None else ckpt.read_model_config(path)
    model = build_model(cfg, par, initialize=False, runtime=runtime)  # weights loaded next
    meta = ckpt.load_model_weights(path, model)
    model.eval()
    model.requires_grad_(False)
    return model, cfg, meta


def checksum(model: torch.nn.Module) -> str:
    """sha256 over this rank's parameters (names, shapes and bytes) and buffers."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def unwrap(model):
    """DDP / Float16Module -> the megatron model."""
    while hasattr(model, "module"):
        model = model.module
    return model


def pair_shapes_fn(teacher_hidden: int):
    """adjust_tensor_shapes_fn for the 1F1B schedule: p2p tensors are [s, b, h_s + h_t]."""

    def adjust(recv_shapes, send_shapes):
        widen = lambda shapes: [(*sh[:-1], sh[-1] + teacher_hidden) for sh in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    return adjust


class TeacherMemo:
    """The teacher's logits kept in memory across distill runs in one process: many students,
    one teacher, the same tokens (the ablations' short KDs of one seed). A hit returns the
    very tensor the teacher computed for that micro-batch before, so a KD with the memo equals
    one without it bit for bit. Keyed by the teacher's checksum and the micro-batch's token and
    position bytes. Single stage without CP only (run_distill passes it then): the output must
    be the logits and depend on this rank's tokens alone. Once `max_bytes` are held, new
    outputs are computed and not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self._d: dict = {}
        self._values: dict = {}

    def clear(self) -> None:
        self._d.clear()
        self._values.clear()
        self.bytes = 0

    def value(self, key, compute):
        """A scalar of the teacher's (its validation loss) under `key`, computed once."""
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]

    def __call__(self, teacher, teacher_sum: str, tokens, pos, mask):
        h = hashlib.sha256(teacher_sum.encode())
        for t in (tokens, pos):
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        key = h.hexdigest()
        out = self._d.get(key)
        if out is not None:
            self.hits += 1
            return out
        self.misses += 1
        out = teacher(tokens, pos, mask)
        n = out.numel() * out.element_size()
        if self.bytes + n <= self.max_bytes:
            self._d[key] = out
            self.bytes += n
        return out


def distill_forward_step(
    data_iterator: Iterator,
    model,
    *,
    teacher,
    student_hidden: int,
    is_first_stage: bool,
    is_last_stage: bool,
    loss_func,
    cp_group=None,
    memo: Optional[tuple] = None,
):
    """forward_step_func for megatron's schedules: teacher (no grad) + student on one stage.

    `loss_func(batch, teacher_logits, student_logits)` returns the schedule's
    (sum loss, tokens, report) triple; it runs on the last stage only. cp_group (size > 1):
    both models get this CP rank's part of the sequences (train/cp.py; the teacher is built
    at the same CP layout) and no mask (the CP attention masks the rank's chunks). memo:
    (TeacherMemo, the teacher's checksum), single stage and no CP only."""
    batch = next(data_iterator)
    if cp_group is not None and cp_group.size() > 1:
        batch = cpsplit.split_batch(batch, cp_group.size(), cp_group.rank())
        mask = None
    else:
        mask = causal_mask(batch["tokens"].shape[1], str(batch["tokens"].device))
    tokens, pos = batch["tokens"], batch["position_ids"]
    student = unwrap(model)
    if not is_first_stage:
        # The schedule handed the received [s, b, h_s + h_t] tensor to the student's
        # set_input_tensor; split it between the two models.
        both = student.decoder.input_tensor
        student.set_input_tensor(both[..., :student_hidden])
        t_dtype = next(teacher.parameters()).dtype
        teacher.set_input_tensor(both[..., student_hidden:].detach().to(t_dtype))
    # Teacher first: its activations are freed before the student's are kept for backward.
    with torch.no_grad():
        t_out = (memo[0](teacher, memo[1], tokens, pos, mask) if memo is not None
                 else teacher(tokens, pos, mask))  # last stage: logits [b, s, V/tp]; else [s, b, h_t]
    s_out = model(tokens, pos, mask)
    if is_last_stage:
        return s_out, partial(loss_func, batch, t_out)
    return torch.cat((s_out, t_out.to(s_out.dtype)), dim=-1), None
