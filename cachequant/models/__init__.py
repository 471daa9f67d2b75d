"""Model-specific code: architecture adapters (one file per family)."""
