"""benchmarks/layer_groups.py: a plan restricted to some layers quantizes exactly those, and stays a
valid plan (saved and loaded again)."""
import cachequant as cq
from cachequant.quant.layer import quant_hooks
from conftest import load_benchmark


def test_restricted_plan_quantizes_only_its_group(make_pipe, tmp_path):
    restrict = load_benchmark("layer_groups").restrict
    pipe = make_pipe("dit")
    cfg = cq.CacheQuantConfig(interval=1, schedule="uniform", calib_batch_size=2, quant_io=True)
    plan = cq.calibrate(pipe, cfg, num_inference_steps=3, progress=False, class_labels=[0, 1])
    names = {s.name for s in plan.quant.layers}
    inside = {n for n in names if n.startswith("transformer_blocks.0.")}
    assert inside and names - inside
    only, gone = restrict(plan, lambda n: n.startswith("transformer_blocks.0."))
    assert {s.name for s in only.quant.layers} == inside and set(gone) >= names - inside
    assert not any(k.split(".", 1)[1] in gone for k in only.tensors if k.startswith(("w.", "act.")))
    only.save(tmp_path / "p.cqplan")
    again = cq.load_plan(tmp_path / "p.cqplan")
    cq.accelerate(pipe, again)
    assert set(quant_hooks(pipe.transformer)) == inside
    cq.restore(pipe)
