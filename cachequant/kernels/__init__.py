"""GPU kernel backends (Triton INT8 / FP8 GEMMs) and CUDA-graph replay for accelerated pipelines."""
