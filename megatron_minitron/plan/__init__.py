"""Pruning plan: `keep` selects keep sets from scores (pure, group-aware)."""
