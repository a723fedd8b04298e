"""CLI: `python -m megatron_minitron STAGE --config RECIPE.yaml [dotted.key=value ...]`.

The same line runs under `torchrun`. Each stage maps to its config dataclass and its
entry point (stages.py); nothing else happens here.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_json, load_stage_config
from .stages import available, runner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_minitron",
                                description="Minitron-SSM compression stages on Megatron-Core")
    p.add_argument("stage", choices=available())
    p.add_argument("--config", "-c", default=None, help="YAML recipe for the stage")
    p.add_argument("--print-config", action="store_true",
                   help="check the settings as the run does, print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check the settings as the run does, print the per-GPU memory estimate at "
                        "the stage's layout and exit (exit status 2 when a setting is refused or "
                        "the estimate exceeds the limit); checkpoints not there yet: their shapes "
                        "from the recipe's *_model keys")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of GPUs (default: $WORLD_SIZE, else the "
                        "fewest the layout runs on, tp x pp x ep)")
    p.add_argument("--device", choices=("gpu", "cpu"), default=None,
                   help="with --dry-run: the device the job runs on (default: gpu when the recipe "
                        "sets parallel.backend=nccl, else this host's)")
    p.add_argument("--gpu-memory-gib", "--memory-gib", dest="memory_gib", type=float, default=None,
                   metavar="GIB",
                   help="with --dry-run: memory per GPU (per rank with --device cpu) of the target "
                        "(default: this host's device; 80 for a GPU job planned on a host without "
                        "one); parallel.memory_limit_gb, when set, is the limit")
    p.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = p.parse_intermixed_args(argv)
    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        p.error(f"--world-size {args.world_size}: give a number of GPUs >= 1, with --dry-run (a "
                "real run takes its world size from torchrun)")
    if args.memory_gib is not None and (not args.dry_run or not args.memory_gib > 0):
        p.error(f"--gpu-memory-gib {args.memory_gib:g}: give the target's memory per GPU in GiB "
                "(> 0, e.g. 80), with --dry-run")
    for flag, val in (("--device", args.device), ("--json", args.json)):
        if val and not args.dry_run:
            p.error(f"{flag} plans a job: use it with --dry-run")
    try:
        cfg = load_stage_config(args.stage, args.config, args.overrides)
        if args.print_config or args.dry_run:
            from .resources.preflight import dry_run, preflight

            pre = preflight(args.stage, cfg, world=args.world_size, need_models=not args.print_config)
            if args.print_config:
                for note in pre.notes:
                    print(f"note: {note}", file=sys.stderr)
                print(dump_json(cfg))
                return 0
            return dry_run(pre, device=args.device, memory_gib=args.memory_gib, as_json=args.json)
        runner(args.stage)(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
