"""Structured removal: attention heads and feed-forward neurons (`prune`), whole blocks (`drop_blocks`)."""
