"""Fewer bits per weight: `quantize` (integer weights and activations, RTN or GPTQ; dynamic int8 or weight-only)
and `cast` (the whole model in 16-bit floats)."""
