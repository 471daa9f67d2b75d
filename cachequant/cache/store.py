"""The feature cache: what full calls leave behind for cached calls to reuse.

A plain mapping from a cache hook's key to the output it stored on the last full call. Entries
are replaced, never cleared, between runs: the step clock decides whether they are usable (a run
reuses only what a full call of the same run stored), and tensors that CUDA-graph replays write
in place must stay referenced.
"""

from __future__ import annotations

from typing import Any


class FeatureCache:
    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value

    def get(self, key: str) -> Any:
        return self.entries[key]

    def feature(self, key: str):
        """The tensor a key holds (the first element of a stored tuple)."""
        v = self.entries.get(key)
        return v[0] if isinstance(v, tuple) else v
