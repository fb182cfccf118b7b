"""Pure maths that methods and layers share: OBS/GPTQ column sweeps, quantization grids, structured slicing
and least-squares refits, factor shapes, tokenizer surgery. No model walking, no data."""
