"""cachequant: training-free acceleration of diffusion models by joint caching and quantization.

>>> import cachequant as cq
>>> plan = cq.calibrate(pipe, cq.CacheQuantConfig(interval=5), num_inference_steps=50, prompts=[...])
>>> cq.accelerate(pipe, plan); images = pipe(prompt, num_inference_steps=50).images; cq.restore(pipe)

The names below load on first use, so that importing a submodule (the command line, say) does not
import diffusers before it has had a chance to configure it.
"""

from importlib import import_module

from .version import __version__

_EXPORTS = {
    "accelerate": ".api", "attach": ".api", "enable_cuda_graphs": ".api", "is_accelerated": ".api",
    "kernel_report": ".api", "restore": ".api", "set_step": ".api",
    "KernelOptions": ".backends.options",
    "dps_schedule": ".cache.schedules",
    "TransformerDescription": ".models.adapters", "BlockStack": ".models.adapters",
    "register_family": ".models.adapters", "unregister_family": ".models.adapters",
    "calibrate": ".calibration.calibrate",
    "autotune": ".search",
    "CacheQuantConfig": ".config",
    "PlanError": ".errors", "PlanMismatchError": ".errors", "WorkflowError": ".errors",
    "Plan": ".plan", "load_plan": ".plan",
    "zoo": ".zoo",
}

_ALIASES = {"register_family": "register", "unregister_family": "unregister"}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cachequant' has no attribute {name!r}")
    module = import_module(_EXPORTS[name], __name__)
    value = module if name == "zoo" else getattr(module, _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
