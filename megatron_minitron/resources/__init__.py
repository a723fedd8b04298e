"""Resource check before launch: per-GPU memory estimates (estimate.py), the stage hook
that refuses a layout that does not fit (check.py), and what --dry-run / --print-config
check before any work (preflight.py)."""
