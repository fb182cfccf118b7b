"""Stages that make compute depend on the example: `early_exit` (heads after blocks; easy rows stop early)."""
