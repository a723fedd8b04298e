"""Stage registry: CLI verb -> (config dataclass, entry point), both as import paths so the
CLI imports only the stage it runs. Data flows one way through the stages:
checkpoint -> importance file -> plan.json -> pruned checkpoint -> distilled checkpoint -> report.
"""

from __future__ import annotations

import importlib
import importlib.util

# verb: (module, config class, run function)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "prepare-data": ("megatron_minitron.data", "DataPrepConfig", "prepare_data"),
    "pretrain": ("megatron_minitron.train.pretrain", "PretrainConfig", "run_pretrain"),
    "eval": ("megatron_minitron.train.pretrain", "EvalConfig", "run_eval"),
    "stats": ("megatron_minitron.importance.stage", "StatsConfig", "run_stats"),
    "plan": ("megatron_minitron.plan.stage", "PlanConfig", "run_plan"),
    "prune": ("megatron_minitron.rewrite.stage", "PruneConfig", "run_prune"),
    "teacher-logits": ("megatron_minitron.distill.logits_stage", "TeacherLogitsConfig", "run_teacher_logits"),
    "distill": ("megatron_minitron.distill.stage", "DistillConfig", "run_distill"),
    "search": ("megatron_minitron.search.stage", "SearchConfig", "run_search"),
    "import-hf": ("megatron_minitron.hf.stage", "ImportHFConfig", "run_import_hf"),
    "export-hf": ("megatron_minitron.hf.stage", "ExportHFConfig", "run_export_hf"),
    "report": ("megatron_minitron.report.stage", "ReportConfig", "run_report"),
    "ablations": ("megatron_minitron.ablations.stage", "AblationsConfig", "run_ablations"),
}


def available() -> list[str]:
    """Stages whose module is present in this installation."""
    out = []
    for verb, (mod, _, _) in REGISTRY.items():
        try:
            if importlib.util.find_spec(mod) is not None:
                out.append(verb)
        except ModuleNotFoundError:
            pass
    return out


def config_class(verb: str) -> type:
    mod, cls, _ = REGISTRY[verb]
    return getattr(importlib.import_module(mod), cls)


def runner(verb: str):
    mod, _, fn = REGISTRY[verb]
    return getattr(importlib.import_module(mod), fn)
