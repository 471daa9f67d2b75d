"""Cache schedules: which steps run the full model (uniform, quadratic, DPS)."""
