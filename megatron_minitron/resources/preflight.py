"""What a stage checks before any work, for `--dry-run` and `--print-config`:

    python -m megatron_minitron STAGE -c RECIPE.yaml --dry-run [--world-size N]
        [--device gpu|cpu] [--gpu-memory-gib G] [--json]
    python -m megatron_minitron STAGE -c RECIPE.yaml --print-config

Settings are checked by the functions the stage's run calls first (validate_pretrain,
importance.stage.validate_settings, ...), so a setting the run refuses is refused here, one
line, exit 2. Inputs an earlier stage makes (checkpoints, plan.json, importance file,
datasets) are checked when they exist; until they do, a dry run takes a model's shape from
the recipe's shape key (student_model / teacher_model / checkpoint_model / target_model):
a model YAML (configs/model/*.yaml), a recipe with a model: mapping, a plan.json (its
target), a model_config.json or a checkpoint; every input not there yet is named in a note.

The estimate is for the device the job will run on: --device, else gpu when the recipe says
parallel.backend=nccl, else this host's; and its memory: parallel.memory_limit_gb when set
(the limit the run enforces), else --gpu-memory-gib, else this host's device when it is the
target, else an 80 GB GPU (H100 / A100 80GB) or this host's memory, said in a note.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, ModelConfig, build, load_yaml
from . import check as C
from . import estimate as E

GPU_GIB_ASSUMED = 80.0  # an 80 GB H100 / A100 when the target GPU's memory is not given
SHAPE_FORMS = ("a model YAML (configs/model/*.yaml), a recipe with a model: mapping, a "
               "plan.json (its target), a model_config.json or a checkpoint")


@dataclass
class Preflight:
    """A stage's settings checked; the models it builds (role -> ModelConfig; search:
    "candidates" -> list) where known, and notes on what could not be checked yet."""
    stage: str
    cfg: Any
    world: int
    world_given: bool
    models: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # role -> where its shape came from
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- shapes


def model_shape(path: str, key: str) -> ModelConfig:
    """The model a shape key names (module docstring: the forms it takes)."""
    from ..train import checkpoint as ckpt

    p = Path(path)
    if ckpt.resolve(p) is not None:
        return ckpt.read_model_config(p)
    if not p.is_file():
        what = "is a folder without a checkpoint" if p.is_dir() else "does not exist"
        raise ConfigError(f"{key}={path!r} {what}; give {SHAPE_FORMS}")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}={path!r} is not valid JSON ({e})") from None
        if isinstance(data, dict) and "target" in data and "source" in data:
            from ..plan.targets import Plan

            return Plan.from_dict(data, f"{key}={path!r}").target
    else:
        data = load_yaml(p)
        if not isinstance(data.get("model"), dict):
            raise ConfigError(f"{key}={path!r} has no model: mapping; give {SHAPE_FORMS}")
        data = data["model"]
    try:
        m = build(ModelConfig, data, "model.")
        m.validate()
    except ConfigError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    return m


def _describe(m: ModelConfig) -> str:
    from ..model import count_parameters

    n = count_parameters(m)["total"]
    return f"{m.num_layers} layers {m.pattern!r}, hidden {m.hidden_size}, {n / 1e9:.2f}B parameters"


def _shape(pre: Preflight, role: str, ckpt_key: str, shape_key: str, need: bool) -> Optional[ModelConfig]:
    """The model of checkpoint `ckpt_key`, else of the shape key; None (a note) when neither
    is there and need is False; ConfigError when need is True."""
    from ..train import checkpoint as ckpt

    cfg = pre.cfg
    path, shape = getattr(cfg, ckpt_key), getattr(cfg, shape_key, "")
    if path and ckpt.resolve(path) is not None:
        m = ckpt.read_model_config(path)
        if shape:
            stated = model_shape(shape, shape_key)
            diff = sorted(k for k, v in m.to_dict().items() if stated.to_dict()[k] != v
                          and k != "seq_length")
            if diff:
                pre.notes.append(f"{ckpt_key}={path} holds another model than {shape_key}={shape} "
                                 f"(they differ in {', '.join(diff)}); the checkpoint's is used")
        pre.models[role], pre.sources[role] = m, f"checkpoint {path}"
        return m
    if shape:
        m = model_shape(shape, shape_key)
        pre.notes.append(f"{ckpt_key}={path}: no checkpoint there yet; the {role}'s shape is "
                         f"{shape_key}={shape}")
        pre.models[role], pre.sources[role] = m, f"{shape_key}={shape}"
        return m
    if need:
        from .table import CONFIGS

        known = sorted(f.name for f in (CONFIGS / "model").glob("*.yaml"))
        raise ConfigError(f"{ckpt_key}={path!r}: no checkpoint there yet, and the estimate needs "
                          f"the {role}'s shape: give {shape_key}=PATH, {SHAPE_FORMS}"
                          + (f" (configs/model/ has {', '.join(known)})" if known else ""))
    pre.notes.append(f"{ckpt_key}={path}: no checkpoint there yet; the {role}'s checks wait for "
                     f"it (or give {shape_key}=PATH)")
    return None


def _data(pre: Preflight, model: Optional[ModelConfig], data=None) -> None:
    """The run's data check when the dataset and tokenizer exist, else a note."""
    from ..data.blend import all_prefixes

    data = data if data is not None else pre.cfg.data
    missing = [p for p in all_prefixes(data.prefix)
               if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file())]
    if not Path(data.tokenizer).exists():
        missing.append(data.tokenizer)
    if missing:
        pre.notes.append(f"data: {', '.join(missing)} not there yet (prepare-data makes it); the "
                         "data check waits for the run")
        return
    from ..data.stage_data import check_data

    check_data(data, model)


def _checkpoint_files(pre: Preflight, key: str) -> None:
    """A checkpoint that exists must be whole (missing / truncated shards)."""
    from ..compat.torch_dist import check_files
    from ..train import checkpoint as ckpt

    it = ckpt.resolve(getattr(pre.cfg, key))
    if it is not None:
        check_files(it)


def _dp(pre: Preflight) -> int:
    p = pre.cfg.parallel
    return pre.world // (p.tp * p.pp * p.cp)


# ----------------------------------------------------------------------------- stages


def _pretrain(pre: Preflight, need: bool) -> None:
    from ..train import checkpoint as ckpt
    from ..train.pretrain import validate_pretrain

    cfg = pre.cfg
    validate_pretrain(cfg, pre.world)
    pre.models["model"], pre.sources["model"] = cfg.model, "the recipe's model:"
    _data(pre, cfg.model)
    if cfg.init_from and ckpt.resolve(cfg.init_from) is None:
        pre.notes.append(f"init_from={cfg.init_from}: no checkpoint there yet")


def _eval(pre: Preflight, need: bool) -> None:
    from ..train.pretrain import validate_eval, validate_eval_model

    validate_eval(pre.cfg)
    m = _shape(pre, "model", "checkpoint", "checkpoint_model", need)
    if m is not None:
        validate_eval_model(pre.cfg, m)
        _data(pre, m)


def _stats(pre: Preflight, need: bool) -> None:
    from ..importance.stage import validate_model, validate_settings

    validate_settings(pre.cfg, pre.world)
    m = _shape(pre, "model", "checkpoint", "checkpoint_model", need)
    if m is not None:
        validate_model(pre.cfg, m)
        _data(pre, m)
    _checkpoint_files(pre, "checkpoint")


def _distill(pre: Preflight, need: bool) -> None:
    from ..distill.stage import validate_models

    cfg = pre.cfg
    cfg.validate(max(_dp(pre), 1))
    s = _shape(pre, "student", "student", "student_model", need)
    t = _shape(pre, "teacher", "teacher", "teacher_model", need)
    if s is not None and t is not None:
        validate_models(cfg, s, t)
        seq = cfg.seq_length or s.seq_length
        pre.models = {"student": dataclasses.replace(s, seq_length=seq),
                      "teacher": dataclasses.replace(t, seq_length=seq)}
        _data(pre, pre.models["student"])
    _teacher_cache(pre)


def _teacher_logits(pre: Preflight, need: bool) -> None:
    from ..distill.logits_stage import validate_models

    cfg = pre.cfg
    cfg.validate()
    m = _shape(pre, "model", "teacher", "teacher_model", need)
    if m is not None:
        validate_models(cfg, m)
        pre.models["model"] = dataclasses.replace(m, seq_length=cfg.seq_length or m.seq_length)
        _data(pre, pre.models["model"])
    _checkpoint_files(pre, "teacher")


def _teacher_cache(pre: Preflight) -> None:
    """distill / search with teacher_cache: the cache's match, once it and the teacher exist."""
    from ..train import checkpoint as ckpt

    cfg = pre.cfg
    path = getattr(cfg, "teacher_cache", "")
    if not path:
        return
    if not (Path(path) / "manifest.json").is_file():
        pre.notes.append(f"teacher_cache={path}: not written yet (`teacher-logits`); its match waits for the run")
        return
    if ckpt.resolve(cfg.teacher) is None:
        pre.notes.append(f"teacher_cache={path}: its teacher check waits for teacher={cfg.teacher}")
        return
    from ..distill.cache import TeacherCache

    t = ckpt.read_model_config(cfg.teacher)
    if getattr(cfg, "kd_train", None):  # search: its short KDs
        tr, loss = cfg.kd_train(), cfg.kd_loss
    else:
        tr, loss = cfg.train, cfg.loss
    seq = cfg.seq_length or (pre.models["student"].seq_length if "student" in pre.models else t.seq_length)
    TeacherCache(path).match(teacher=cfg.teacher, data=cfg.data, seq=seq,
                             samples_needed=tr.steps * tr.global_batch_size, temperature=loss.temperature)


def _prune(pre: Preflight, need: bool) -> None:
    from ..plan.targets import Plan
    from ..rewrite.stage import validate_plan, validate_settings

    cfg = pre.cfg
    validate_settings(cfg)
    plan_file = Path(cfg.plan) / "plan.json" if Path(cfg.plan).is_dir() else Path(cfg.plan)
    plan = Plan.load(cfg.plan) if plan_file.is_file() else None
    # the estimate needs the source's shape: the checkpoint's, the shape key's or the plan's
    src = _shape(pre, "model", "checkpoint", "checkpoint_model", need=need and plan is None)
    if plan is None:
        if cfg.target_model:
            target = model_shape(cfg.target_model, "target_model")
            pre.notes.append(f"plan={cfg.plan}: not there yet; the target's shape is "
                             f"target_model={cfg.target_model}")
        else:
            target = None
            pre.notes.append(f"plan={cfg.plan}: not there yet; the target's checks wait for it "
                             "(or give target_model=PATH)")
    else:
        target = plan.target
        if src is None:  # the plan knows the model it was made for
            src = pre.models["model"] = plan.source
            pre.sources["model"] = f"plan {cfg.plan} (its source)"
    if target is not None:
        pre.models["target"], pre.sources["target"] = target, (
            f"plan {cfg.plan}" if plan is not None else f"target_model={cfg.target_model}")
    if src is not None and target is not None:
        validate_plan(cfg, src, plan.source if plan is not None else None, target, cfg.checkpoint)
    _checkpoint_files(pre, "checkpoint")


def _search(pre: Preflight, need: bool) -> None:
    from ..importance.io import ImportanceFile
    from ..search.stage import budget_of, candidates, depth_drop_order, validate_settings, validate_teacher

    cfg = pre.cfg
    validate_settings(cfg, pre.world)
    t = _shape(pre, "teacher", "teacher", "teacher_model", need)
    if t is None:
        return
    validate_teacher(cfg, t)
    if Path(cfg.importance).is_file():
        imp = ImportanceFile.load(cfg.importance)
        if imp.model.to_dict() != t.to_dict():
            raise ConfigError(f"importance={cfg.importance!r} was collected on another model than "
                              f"the teacher ({pre.sources['teacher']}); run `stats` on this teacher")
        order = depth_drop_order(cfg, t, imp)
    else:
        order = list(range(t.num_layers))[::-1]
        pre.notes.append(f"importance={cfg.importance}: not there yet (stats makes it); candidates "
                         "that drop layers drop the last ones here (the run drops the least "
                         "important), so their count and estimate are approximate")
    cands, _ = candidates(cfg, t, order)
    seq = cfg.seq_length or t.seq_length
    pre.models["teacher"] = dataclasses.replace(t, seq_length=seq)
    pre.models["candidates"] = [dataclasses.replace(c.model_config(t), seq_length=seq) for c in cands]
    pre.sources["candidates"] = f"{len(cands)} candidates within {budget_of(cfg, t.seq_length).describe()}"
    _data(pre, t)
    _teacher_cache(pre)


def _plan(pre: Preflight, need: bool) -> None:
    """plan: the run's make_plan when the importance file exists (it writes nothing)."""
    from ..importance.io import ImportanceFile
    from ..plan.stage import plan_for

    cfg = pre.cfg
    cfg.parallel.validate()
    if not Path(cfg.importance).is_file():
        pre.notes.append(f"importance={cfg.importance}: not there yet (stats makes it); the "
                         "target's checks wait for it")
        return
    plan = plan_for(cfg, ImportanceFile.load(cfg.importance))
    pre.models["target"], pre.sources["target"] = plan.target, f"the plan of {cfg.importance}"


def _import_hf(pre: Preflight, need: bool) -> None:
    """import-hf: the run's whole check (config.json, tensor headers) when hf_dir exists."""
    from ..hf.stage import _check_import, validate_import_settings

    validate_import_settings(pre.cfg)
    if Path(pre.cfg.hf_dir).is_dir():
        _check_import(pre.cfg)[0].close()
    else:
        pre.notes.append(f"hf_dir={pre.cfg.hf_dir}: not there yet; its checks wait for it")


def _export_hf(pre: Preflight, need: bool) -> None:
    """export-hf: the run's whole check (model, tokenizer, output) when the checkpoint exists."""
    from ..hf.stage import _check_export, validate_export_settings
    from ..train import checkpoint as ckpt

    validate_export_settings(pre.cfg)
    if ckpt.resolve(pre.cfg.checkpoint) is not None:
        _check_export(pre.cfg)
    else:
        pre.notes.append(f"checkpoint={pre.cfg.checkpoint}: no checkpoint there yet; its checks "
                         "wait for it")


def _settings(pre: Preflight, need: bool) -> None:
    """Stages without a preflight of their own: their parallel / data sections."""
    for key in ("parallel", "data"):
        sec = getattr(pre.cfg, key, None)
        if hasattr(sec, "validate"):
            sec.validate()


STAGES = {"pretrain": _pretrain, "eval": _eval, "stats": _stats, "distill": _distill,
          "prune": _prune, "search": _search, "plan": _plan, "import-hf": _import_hf,
          "export-hf": _export_hf, "teacher-logits": _teacher_logits}


def default_world(cfg) -> tuple[int, bool]:
    """(world size, given): $WORLD_SIZE, else the fewest processes the layout runs on."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), True
    p = getattr(cfg, "parallel", None)
    return (p.tp * p.pp * p.ep * getattr(p, "cp", 1) if p is not None else 1), False


def preflight(stage: str, cfg, world: Optional[int] = None, need_models: bool = True) -> Preflight:
    """Every check the stage's run makes before work that this machine can make now.
    need_models: the models' shapes are required (a dry run); else a missing one is a note."""
    given = world is not None
    if world is None:
        world, given = default_world(cfg)
    pre = Preflight(stage, cfg, world, given)
    STAGES.get(stage, _settings)(pre, need_models)
    return pre


# ----------------------------------------------------------------------------- the dry run


def target(cfg, device: Optional[str], memory_gib: Optional[float],
           stage: str = "") -> tuple[str, float, list[str]]:
    """(device, limit GiB, notes) of the job: module docstring. prune works on the host:
    its limit is the host's memory (or --memory-gib)."""
    notes = []
    p = getattr(cfg, "parallel", None)
    host = C.impl()
    if device is None:
        device = "gpu" if p is not None and p.backend == "nccl" else host
    if stage == "prune":
        device = "cpu"
    if memory_gib is not None:
        mem, src = memory_gib, "--gpu-memory-gib"
    elif device == host or stage == "prune":
        mem, src = C.device_limit_gb(0.0, device), "this host's " + ("GPU" if device == "gpu" else "memory per rank")
    elif device == "gpu":
        mem, src = GPU_GIB_ASSUMED, "assumed"
        notes.append(f"no GPU on this host: an {GPU_GIB_ASSUMED:g} GiB GPU (H100 / A100 80GB) is "
                     "assumed; give --gpu-memory-gib N for another")
    else:
        mem, src = C.host_memory_gb(), "this host's memory per rank"
    limit = p.memory_limit_gb if p is not None and p.memory_limit_gb > 0 else mem
    if p is not None and p.memory_limit_gb > 0:
        src = "parallel.memory_limit_gb"
        if p.memory_limit_gb > mem:
            notes.append(f"parallel.memory_limit_gb={p.memory_limit_gb:g} is above the device's "
                         f"{mem:.1f} GiB: the run's check lets through what may not fit")
    notes.append(f"limit: {limit:.1f} GiB per {'GPU' if device == 'gpu' else 'rank'} ({src})")
    return device, limit, notes


def dry_run(pre: Preflight, device: Optional[str] = None, memory_gib: Optional[float] = None,
            as_json: bool = False) -> int:
    """Print the estimate of pre's stage (text, or one JSON object); 0 when it fits, else
    ConfigError naming the excess (the fixes are printed)."""
    stage, cfg = pre.stage, pre.cfg
    notes = list(pre.notes)
    if not pre.world_given and stage in C.ESTIMATED and stage != "prune":  # prune: one process
        notes.append(f"world size {pre.world}: the fewest processes this layout runs on "
                     "(tp x pp x ep x cp); give --world-size N for the job's")
    if stage not in C.ESTIMATED:
        return _no_estimate(pre, notes, as_json)
    device, limit, tnotes = target(cfg, device, memory_gib, stage)
    notes += tnotes
    est, limit, fixes = C.report(stage, cfg, pre.world, pre.models, device, limit,
                                 whole_world=pre.world_given)
    fit = E.fits(est, limit)
    models = {r: {"source": pre.sources.get(r, ""), "pattern": m.pattern,
                  "hidden_size": m.hidden_size}
              for r, m in pre.models.items() if isinstance(m, ModelConfig)}
    if as_json:
        p = cfg.parallel
        print(json.dumps({
            "stage": stage, "device": device, "world_size": pre.world,
            "layout": {"tp": p.tp, "pp": p.pp, "ep": p.ep, "cp": getattr(p, "cp", 1),
                       "sequence_parallel": p.sequence_parallel and p.tp > 1},
            "pipeline_stage": est.pp_stage,
            "items_gib": {k: round(v / E.GiB, 4) for k, v in est.items.items()},
            "total_gib": round(est.total / E.GiB, 4), "limit_gib": round(limit, 4), "fits": fit,
            "would_fit_with": fixes, "models": models, "notes": notes + est.notes}, indent=2))
    else:
        for r, m in models.items():
            print(f"[{stage}] {r}: {m['source']}")
        print(C.describe(stage, est, limit, pre.world, C.layout_text(cfg.parallel), device)
              + ("" if fit else "\n  would fit with: " + ("; ".join(fixes) or "none found")))
        for n in notes:
            print(f"  note: {n}")
    if not fit:
        raise ConfigError(f"{stage}: the estimate {est.total / E.GiB:.1f} GiB per "
                          f"{'GPU' if device == 'gpu' else 'rank'} exceeds the limit {limit:.1f} GiB")
    return 0


def _no_estimate(pre: Preflight, notes: list, as_json: bool) -> int:
    what = ("settings checked; no memory estimate for this stage (the stages with one: "
            f"{', '.join(C.ESTIMATED)})")
    if as_json:
        print(json.dumps({"stage": pre.stage, "estimate": None, "notes": [what] + notes}, indent=2))
    else:
        print(f"[{pre.stage}] {what}")
        for n in notes:
            print(f"  note: {n}")
    return 0
