"""Checkpoint rewrite to a pruning plan: key -> (dims, keep indices) rules (pure) and the
sharded load / trim / save / verify / atomic-swap stage."""
