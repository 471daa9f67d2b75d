"""Exceptions with messages meant for users: what was wrong and what to do."""


class PlanError(ValueError):
    """A plan file is missing, damaged, foreign, or of an unsupported format version."""


class PlanMismatchError(ValueError):
    """A plan is used with a model, scheduler or step count it was not calibrated for."""
