"""cachequant: training-free acceleration of diffusion models by joint caching and quantization.

>>> import cachequant as cq
>>> plan = cq.calibrate(pipe, cq.CacheQuantConfig(interval=5), num_inference_steps=50, prompts=[...])
>>> cq.accelerate(pipe, plan); images = pipe(prompt, num_inference_steps=50).images; cq.restore(pipe)
"""

__version__ = "0.1.0"

from .api import accelerate, is_accelerated, kernel_report, reset_steps, restore  # noqa: E402
from .cache.schedules import dps_schedule  # noqa: E402
from .calibration.calibrate import calibrate  # noqa: E402
from .config import CacheQuantConfig  # noqa: E402
from .errors import PlanError, PlanMismatchError  # noqa: E402
from .kernels.graphs import enable_cuda_graphs  # noqa: E402
from .plan import Plan, load_plan  # noqa: E402
from . import zoo  # noqa: E402

__all__ = [
    "CacheQuantConfig", "Plan", "PlanError", "PlanMismatchError", "accelerate", "calibrate", "dps_schedule", "enable_cuda_graphs",
    "is_accelerated", "kernel_report", "load_plan", "reset_steps", "restore", "zoo", "__version__",
]
