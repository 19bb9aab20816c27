"""Training with quantization: QAT, distillation, LoRA (being built: issue 22)."""
