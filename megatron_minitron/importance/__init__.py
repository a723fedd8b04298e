"""Importance: hooks accumulate, `scores` turns accumulators into scores (pure)."""
