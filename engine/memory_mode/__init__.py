"""Memory mode (memory_mode=true): what lets the 1.44B model (1.44e9 parameters) train in 8 GiB (8.59e9 bytes) of
GPU memory.

Bytes per parameter, against 16 for bf16-autocast AdamW with fp32 weights (weights 4, grads 4, states 8):
  bf16 weight, no fp32 master copy ................................ 2  (optimizer.prepare_model_for_memory_mode)
  AdamW's two states in 8 bits, one fp32 scale per 256 ............ 2.03
  8-bit gradient accumulator, only when accumulating micro-steps .. 1.02
  gradients ....................................................... ~0: each parameter is updated inside
    backward the moment its gradient is complete, and the gradient freed (optimizer.InBackwardOptimizer)
That is 5.8e9 bytes at 1.44e9 parameters (7.3e9 with accumulation); estimate.estimate_memory_mode_bytes adds the
activations and temporaries and says what is left.

kernels/adamw_8bit_torch.py: the 8-bit block-quantized format in PyTorch (the reference, and the CPU path);
kernels/adamw_8bit.py: the same format and the fused AdamW update in Triton (imported only on CUDA, so this package
imports without triton); optimizer.py: the AdamW that runs inside backward; estimate.py: bytes on the GPU at the
peak of a step.
"""
