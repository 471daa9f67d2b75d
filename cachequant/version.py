"""The package version (one place; the plan records it)."""

__version__ = "0.2.0"
