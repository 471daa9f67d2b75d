import os

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes them crawl when
# another process shares the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on a machine without a GPU (read at import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def run(pipe, kind, steps, seed=0, n=2, **kw):
    """Runs a tiny pipeline deterministically and returns float64 numpy images."""
    g = torch.Generator("cpu").manual_seed(seed)
    if kind == "ddim":
        out = pipe(batch_size=n, num_inference_steps=steps, generator=g, output_type="np", **kw)
    elif kind == "sd":
        prompts = ["a red cat", "a tree in the snow", "a small boat", "two dogs"][:n]
        out = pipe(prompts, num_inference_steps=steps, generator=g, output_type="np", height=16, width=16, **kw)
    else:
        out = pipe(class_labels=list(range(n)), num_inference_steps=steps, generator=g, output_type="np", **kw)
    return np.asarray(out.images, dtype=np.float64)


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str):
    """A script of ``benchmarks/`` (``"speed"``, ``"device/carry_variant"``) imported as a module
    under its file's name (registered in ``sys.modules``; ``benchmarks/`` on ``sys.path``, where the
    scripts find their harness)."""
    import importlib.util
    import sys

    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    mod_name = name.rsplit("/", 1)[-1]
    spec = importlib.util.spec_from_file_location(mod_name, os.path.join(BENCHMARKS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def load_harness(name: str):
    """A module of the benchmarks' shared harness, ``benchmarks/harness/<name>.py`` (imported as
    ``harness.<name>``, as the scripts import it: spawned worker processes unpickle its functions)."""
    import importlib
    import sys

    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(f"harness.{name}")


def mini_cifar_zip(folder):
    """A CIFAR-10-style zip (train/<class>/<n>.jpg) of four random 32×32 JPEGs, for smoke tests of
    the training script."""
    import io
    import zipfile

    from PIL import Image

    data = folder / "mini.zip"
    with zipfile.ZipFile(data, "w") as z:
        for i, cls in enumerate(["airplane", "cat", "truck", "dog"]):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
            z.writestr(f"train/{cls}/{i:04d}.jpg", buf.getvalue())
    return data


def calib_kwargs(kind, n=4):
    if kind == "sd":
        return {"prompts": ["a photo of a dog", "a castle", "an apple on a table", "a city at night"][:n]}
    if kind == "dit":
        return {"class_labels": list(range(n))}
    return {"num_samples": n}


@pytest.fixture
def make_pipe():
    from cachequant.models.tiny import tiny_ddim_pipeline, tiny_dit_pipeline, tiny_sd_pipeline

    makers = {"ddim": tiny_ddim_pipeline, "sd": tiny_sd_pipeline, "dit": tiny_dit_pipeline}

    def make(kind, **kw):
        return makers[kind](**kw)

    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "fresh_thread: run the test body in a new thread (see pytest_pyfunc_call)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Tests marked ``fresh_thread`` run in a new thread. Why: CPython 3.11 frees the top chunk of a
    thread's frame stack (16 KiB) whenever the stack shrinks back below it, and maps a new one when it
    grows again. Below pytest's deep stack, Triton's interpreter oscillates across such a boundary
    millions of times per pipeline run (an mmap / munmap pair each: 14 s of system time in a 60 s
    test); a new thread's frame stack starts at the bottom, and the same run took half the time."""
    if pyfuncitem.get_closest_marker("fresh_thread") is None:
        return None
    import threading

    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    outcome: dict = {}

    def body():
        try:
            pyfuncitem.obj(**args)
        except BaseException as e:  # re-raised in the test's own thread
            outcome["error"] = e

    t = threading.Thread(target=body, name=pyfuncitem.name)
    t.start()
    t.join()
    if "error" in outcome:
        raise outcome["error"]
    return True
