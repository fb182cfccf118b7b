"""Unstructured and N:M sparsity: `sparsify` (magnitude, Wanda, SparseGPT)."""
