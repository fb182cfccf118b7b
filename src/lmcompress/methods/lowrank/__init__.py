"""Low-rank factorisation: `svd`, `whitened_svd`, `fisher_svd`; shared sizing in `_common`."""
