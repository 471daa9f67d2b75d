"""Quality metrics of accelerated vs full-precision images."""

from .image import psnr

__all__ = ["psnr"]
