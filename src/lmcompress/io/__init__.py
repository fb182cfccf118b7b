"""Input and output: save/load of compressed models (safetensors + manifest), model loading, Hugging Face
and ONNX export."""
