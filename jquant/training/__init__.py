"""Training with quantization: QAT with LSQ scales, quantization-aware distillation, LoRA/QLoRA.

* :mod:`jquant.training.fakequant`: LSQ fake quantization (custom VJP), :class:`FakeQuant`
  trainable kernels, the differentiable training forward :func:`fake_quantized`.
* :mod:`jquant.training.distill`: the float model teaches its quantized copy on sampled
  trajectories (both CFG branches); optax step, checkpoints through :mod:`jquant.io.checkpoint`.
* :mod:`jquant.training.qat`: QAT on the task loss (flow matching on the tiny Wan's data).
* :mod:`jquant.training.lora`: run-time LoRA on quantized bases (the low-rank branch),
  merge/requantize, QLoRA fine-tuning, LoftQ initialisation.

Community LoRA files (diffusers/PEFT, kohya) are read by :mod:`jquant.io.lora`.
"""
