"""Resource check before launch: per-GPU memory estimates (estimate.py) and the stage
hook that prints them (--dry-run) or refuses a layout that does not fit (check.py)."""
