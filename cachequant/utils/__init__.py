"""Small shared helpers (atomic file output, image grids)."""
