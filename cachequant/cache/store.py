"""The feature cache: what full calls leave behind for cached calls to reuse.

A plain mapping from (a cache hook's key, the call's branch) to the output it stored on the last
full call. The branch (:attr:`StepClock.branch`) keeps apart the calls a pipeline makes at one
sampler step — the conditional and the unconditional prediction of guidance as separate calls
have different inputs, so each reuses only what its own branch stored. Entries are replaced,
never cleared, between runs: the step clock decides whether they are usable (a run reuses only
what a full call of the same run stored), and tensors that CUDA-graph replays write in place must
stay referenced.
"""

from __future__ import annotations

from typing import Any


class FeatureCache:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], Any] = {}

    def put(self, key: str, value: Any, branch: int = 0) -> None:
        self.entries[(key, branch)] = value

    def get(self, key: str, branch: int = 0) -> Any:
        return self.entries[(key, branch)]

    def feature(self, key: str, branch: int = 0):
        """The tensor a key holds (the first element of a stored tuple)."""
        v = self.entries.get((key, branch))
        return v[0] if isinstance(v, tuple) else v
