"""Integer weights (and activations): `quantize` (RTN or GPTQ; dynamic int8 or weight-only)."""
