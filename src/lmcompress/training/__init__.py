"""Training loops: task fine-tuning and anytime distillation of a compressed student."""
