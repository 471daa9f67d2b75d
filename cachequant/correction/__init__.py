"""Decoupled error correction (DEC): the cache half and the quantization half."""

from .cache_dec import fit_cache_dec, relative_reuse_error, reuse_spread_ratio
from .quant_dec import QuantDecStats

__all__ = ["fit_cache_dec", "relative_reuse_error", "reuse_spread_ratio", "QuantDecStats"]
