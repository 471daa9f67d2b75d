"""Triton kernels: pure functions on tensors (8-bit GEMM / implicit-GEMM convolution, activation
quantization, one-pass fake quantization, NHWC GroupNorm) and their tile tables. Nothing here
imports the rest of cachequant; :mod:`cachequant.backends` builds the execution on top."""
