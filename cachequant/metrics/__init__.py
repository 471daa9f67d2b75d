"""Metrics: FID (standard Inception), precision/recall, PSNR/SSIM vs full precision, MACs/Bops."""

from .image import psnr, ssim

__all__ = ["psnr", "ssim"]
