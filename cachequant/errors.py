"""Exceptions with messages meant for users: what was wrong and what to do."""


class PlanError(ValueError):
    """A plan file is missing, damaged, foreign, or of an unsupported format version."""


class PlanMismatchError(ValueError):
    """A plan is used with a model, scheduler, step count or strength it was not calibrated for."""


class WorkflowError(RuntimeError):
    """The pipeline is in a state cachequant cannot run correctly (another library's hooks, an
    offloading mode, a replaced attention processor, a LoRA loaded after ``accelerate``...). The
    message names what was found and how to get to a supported state."""
