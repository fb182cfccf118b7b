"""Vocabulary pruning: `vocab` keeps the embedding rows of tokens the task uses."""
