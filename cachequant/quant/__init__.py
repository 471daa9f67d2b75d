"""Post-training quantization: quantizers, quantized layers (fake-quant reference + backend slot)."""
