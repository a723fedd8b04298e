"""The check slurm/pipeline.sh runs before it submits anything (it assembles no command):

  python slurm/pipeline_check.py [--dry-run] -- STAGE RECIPE [KEY=VALUE ...] [-- STAGE RECIPE ...]

1. Each stage's recipe and overrides load as that stage's config, strictly, exactly as the job
   loads them (megatron_minitron.config.load_stage_config): unknown keys and wrong types fail.
2. The wiring: every path a stage reads must be written by an earlier stage of the chain or
   exist now; an empty one (import-hf's hf_dir) is refused. A dry run only notes a path that
   does not exist yet. An output that no later stage reads is warned about.

Prints what each stage reads (and from which stage) and writes. Run from the repository root
(paths in recipes are relative to it, as in the jobs). Errors: one line on stderr, exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# stage -> config keys naming a path it reads ("data": data.prefix's .bin/.idx and
# data.tokenizer); keys in OPTIONAL may be empty (not used then)
READS = {
    "import-hf": ["hf_dir"],
    "pretrain": ["init_from", "data"],
    "stats": ["checkpoint", "data"],
    "plan": ["importance"],
    "search": ["teacher", "importance", "data"],
    "prune": ["checkpoint", "plan"],
    "distill": ["student", "teacher", "data"],
    "export-hf": ["checkpoint", "tokenizer"],
    "eval": ["checkpoint", "data"],
}
OPTIONAL = {("pretrain", "init_from"), ("export-hf", "tokenizer")}
# stage -> the key naming what it writes
WRITES = {"import-hf": "output_dir", "pretrain": "output_dir", "stats": "output_dir",
          "plan": "output_dir", "search": "output_dir", "prune": "output",
          "distill": "output_dir", "export-hf": "output_dir", "eval": "output_dir"}
# stages whose output is meant for a later stage (eval / export-hf write end products)
FEEDS = {"import-hf", "pretrain", "stats", "plan", "search", "prune", "distill"}


def _norm(p: str) -> str:
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(os.getcwd(), p))


def _under(p: str, out: str) -> bool:
    p, out = _norm(p), _norm(out)
    return p == out or p.startswith(out.rstrip(os.sep) + os.sep)


def _is_number(v) -> bool:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return True
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _prefixes(p) -> list[str]:
    """data.prefix in megatron's forms: one prefix, [w1, p1, ...] / [p1, ...], {split: ...}."""
    if isinstance(p, str):
        return [p] if p else []
    if isinstance(p, dict):
        return [x for v in p.values() for x in _prefixes(v)]
    if isinstance(p, (list, tuple)):
        return [x for v in p if not _is_number(v) for x in _prefixes(v)]
    return []


def _reads(stage: str, cfg) -> list[tuple[str, str, list[str]]]:
    """(label, path, files that must exist) per path the stage reads; path '' = empty."""
    out = []
    for key in READS.get(stage, []):
        if key == "data":
            data = getattr(cfg, "data", None)
            if data is None:
                continue
            for p in _prefixes(getattr(data, "prefix", "")):
                out.append(("data.prefix", p, [p + ".bin", p + ".idx"]))
            tok = getattr(data, "tokenizer", "")
            if tok:
                out.append(("data.tokenizer", tok, [tok]))
            continue
        if not hasattr(cfg, key):
            continue
        value = str(getattr(cfg, key) or "")
        if (stage, key) in OPTIONAL and value in ("", "auto", "none"):
            continue
        out.append((key, value, [value]))
    return out


def _writes(stage: str, cfg) -> str:
    key = WRITES.get(stage)
    value = str(getattr(cfg, key, "") or "") if key else ""
    if stage == "prune" and not value:
        value = str(cfg.checkpoint)  # in place
    if stage == "eval" and not value:
        value = os.path.join(str(cfg.checkpoint), "eval")
    return value


def _parse(argv: list[str]):
    dry = False
    if argv and argv[0] == "--dry-run":
        dry, argv = True, argv[1:]
    if not argv or argv[0] != "--":
        raise SystemExit("usage: pipeline_check.py [--dry-run] -- STAGE RECIPE [KEY=VALUE ...] [-- ...]")
    stages, cur = [], None
    for a in argv:
        if a == "--":
            cur = []
            stages.append(cur)
        else:
            cur.append(a)
    return dry, [(g[0], g[1], g[2:]) for g in stages if len(g) >= 2]


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    dry, stages = _parse(argv)
    try:
        from megatron_minitron.config import load_stage_config
    except Exception as e:  # noqa: BLE001 (an install problem, said in one line)
        return _fail(f"cannot check the recipes: megatron_minitron does not import ({type(e).__name__}: "
                     f"{e}); fix the environment ($PYTHON), or pass --no-check to submit unchecked")
    names = [st for st, _, _ in stages]

    def target(i: int) -> str:  # how an override names stage i
        return names[i] if names.count(names[i]) == 1 else str(i + 1)

    cfgs = []
    for i, (st, recipe, ovs) in enumerate(stages):
        try:
            cfgs.append(load_stage_config(st, recipe, ovs))
        except Exception as e:  # noqa: BLE001 (ConfigError; anything else also in one line)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            return _fail(f"stage {i + 1} {st} ({recipe}{' ' + ' '.join(ovs) if ovs else ''}): {msg}")

    outs = [_writes(st, c) for (st, _, _), c in zip(stages, cfgs)]
    missing, lines, read_outs = [], [], set()
    for i, ((st, recipe, ovs), cfg) in enumerate(zip(stages, cfgs)):
        lines.append(f"{i + 1} {st}: {recipe}{' ' + ' '.join(ovs) if ovs else ''}")
        for label, path, files in _reads(st, cfg):
            if not path:
                return _fail(f"stage {i + 1} {st} ({recipe}): {label} is empty; give it as "
                             f"{target(i)}.{label}=PATH")
            src = next((j for j in range(i - 1, -1, -1) if outs[j] and _under(path, outs[j])), None)
            if src is not None:
                read_outs.add(src)
                lines.append(f"    reads {label}={path}  <- {src + 1} {stages[src][0]}")
            elif all(os.path.exists(f) for f in files):
                lines.append(f"    reads {label}={path}  (exists)")
            else:
                later = next((j for j in range(i + 1, len(stages)) if outs[j] and _under(path, outs[j])), None)
                why = (f"written only by the later stage {later + 1} {stages[later][0]}" if later is not None
                       else "written by no earlier stage")
                lines.append(f"    reads {label}={path}  NOT FOUND ({why})")
                missing.append(f"stage {i + 1} {st} {label}={path}")
        if outs[i]:
            lines.append(f"    writes {WRITES[st]}={outs[i]}")
    for line in lines:
        print(f"[pipeline] {line}")
    for i, (st, _, _) in enumerate(stages[:-1]):
        if st in FEEDS and outs[i] and i not in read_outs:
            print(f"[pipeline] warning: stage {i + 1} {st} writes {outs[i]}, which no later stage reads "
                  "(is a later recipe reading another path?)", file=sys.stderr)
    if missing:
        if dry:
            n = len({m.split("=", 1)[1] for m in missing})
            print(f"[pipeline] note: {n} path(s) marked NOT FOUND must exist before a real submit "
                  "(it refuses until then)")
        else:
            return _fail("not found, and written by no earlier stage of the chain: " + "; ".join(missing)
                         + " (create them, or fix the recipes / overrides; --dry-run shows the wiring)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
