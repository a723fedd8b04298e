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
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-GPU memory estimate at the stage's layout and exit "
                        "(exit status 2 when it does not fit parallel.memory_limit_gb)")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of GPUs (default: $WORLD_SIZE or 1)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = p.parse_intermixed_args(argv)
    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        p.error(f"--world-size {args.world_size}: give a number of GPUs >= 1, with --dry-run (a "
                "real run takes its world size from torchrun)")
    try:
        cfg = load_stage_config(args.stage, args.config, args.overrides)
        if args.print_config:
            print(dump_json(cfg))
            return 0
        if args.dry_run:
            from .resources.check import check

            check(args.stage, cfg, world=args.world_size, dry_run=True)
            return 0
        runner(args.stage)(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
