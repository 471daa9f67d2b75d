"""cachequant: training-free acceleration of diffusion models by joint caching and quantization.

>>> import cachequant as cq
>>> plan = cq.calibrate(pipe, cq.CacheQuantConfig(interval=5), num_inference_steps=50, prompts=[...])
>>> cq.accelerate(pipe, plan); images = pipe(prompt, num_inference_steps=50).images; cq.restore(pipe)
"""

from .version import __version__  # noqa: E402
from .api import accelerate, attach, enable_cuda_graphs, is_accelerated, kernel_report, restore, set_step  # noqa: E402
from .backends.options import KernelOptions  # noqa: E402
from .cache.schedules import dps_schedule  # noqa: E402
from .calibration.calibrate import calibrate  # noqa: E402
from .config import CacheQuantConfig  # noqa: E402
from .errors import PlanError, PlanMismatchError, WorkflowError  # noqa: E402
from .plan import Plan, load_plan  # noqa: E402
from . import zoo  # noqa: E402

__all__ = [
    "CacheQuantConfig", "KernelOptions", "Plan", "PlanError", "PlanMismatchError", "WorkflowError", "accelerate",
    "attach", "calibrate", "dps_schedule", "enable_cuda_graphs", "is_accelerated", "kernel_report", "load_plan",
    "restore", "set_step", "zoo", "__version__",
]
