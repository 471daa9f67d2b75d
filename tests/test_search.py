"""cq.autotune: every candidate of the grid measured on held-out inputs, the cheapest within budget."""

import math

import pytest

import cachequant as cq


def _small_config():
    return cq.CacheQuantConfig(schedule="uniform", dec=True, num_calib_samples=2, calib_batch_size=2, dps_samples=2)


@pytest.fixture(scope="module")
def result():
    from cachequant.models.tiny import tiny_ddim_pipeline

    pipe = tiny_ddim_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    res = cq.autotune(pipe, 4, min_psnr=1.0, intervals=(1, 2), bits=("fp", "w8a8", "w4a8"),
                      config=_small_config(), eval_images=2, progress=False)
    after = pipe.unet.state_dict()
    assert not cq.is_accelerated(pipe) and all(v.equal(after[k]) for k, v in before.items())  # left as it was
    return pipe, res


def test_every_candidate_is_measured_and_the_best_is_the_cheapest_within_budget(result):
    _, res = result
    assert {(c.interval, c.bits) for c in res.candidates} == {(1, "w8a8"), (1, "w4a8"), (2, "fp"), (2, "w8a8"),
                                                              (2, "w4a8")}
    for c in res.candidates:
        assert c.psnr > 0 and c.bops > 0 and c.macs > 0
        assert list(c.plan.cache.schedule) == ([0, 1, 2, 3] if c.interval == 1 else [0, 2])
    # caching executes fewer MACs; 8-bit weighs each MAC by 64 bit-products instead of 1024
    by = {(c.interval, c.bits): c for c in res.candidates}
    assert by[2, "fp"].macs < res.fp_macs and by[1, "w8a8"].macs == pytest.approx(res.fp_macs)
    # 8×8-bit ops are 1/16 of 32×32; the first and last layers stay float (quant_io), a few % here
    assert res.fp_bops / 16 < by[1, "w8a8"].bops < res.fp_bops / 8
    assert by[2, "w4a8"].bops < by[2, "w8a8"].bops < by[2, "fp"].bops
    assert by[1, "w8a8"].psnr > by[1, "w4a8"].psnr  # 4-bit weights cost more than 8-bit
    ok = [c for c in res.candidates if c.psnr >= res.min_psnr]
    assert res.best is min(ok, key=lambda c: c.bops) and res.plan is res.best.plan


def test_budget_decides_and_the_frontier_is_not_dominated(result, tmp_path):
    _, res = result
    strict = cq.search.AutotuneResult(res.candidates, 1e9, "bops", res.fp_macs, res.fp_bops)
    assert strict.best is None and strict.plan is None
    loose = cq.search.AutotuneResult(res.candidates, 1.0, "macs", res.fp_macs, res.fp_bops)
    assert loose.best.macs == min(c.macs for c in res.candidates)
    front = res.frontier
    for c in front:  # nothing is both cheaper-or-equal and strictly better
        assert not any(o.bops <= c.bops and o.psnr > c.psnr for o in res.candidates if o is not c)
    rows = res.table()
    assert len(rows) == len(res.candidates) and sum(r["on_frontier"] for r in rows) == len(front)
    path = res.plot(tmp_path / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs,message", [
    ({"min_psnr": -1}, "min_psnr must be a positive number"),
    ({"min_psnr": math.inf}, "min_psnr must be a positive number"),
    ({"min_psnr": 20, "intervals": (0, 2)}, "intervals must be positive integers"),
    ({"min_psnr": 20, "bits": ("w8a4",)}, "bits must be among fp, w8a8, w4a8"),
    ({"min_psnr": 20, "intervals": (1,), "bits": ("fp",)}, "only full precision"),
    ({"min_psnr": 20, "cost": "seconds"}, "cost must be one of bops, macs"),
    ({"min_psnr": 20, "eval_images": 0}, "eval_images must be a positive integer"),
])
def test_bad_arguments_are_refused_before_any_work(make_pipe, kwargs, message):
    pipe = make_pipe("ddim")
    with pytest.raises(ValueError, match=message):
        cq.autotune(pipe, 4, **kwargs)


def test_text_pipelines_need_held_out_prompts(make_pipe):
    with pytest.raises(ValueError, match="give eval_inputs"):
        cq.autotune(make_pipe("sd"), 4, min_psnr=20)


def test_command_line_writes_the_best_plan_table_and_plot(tmp_path, capsys):
    import json

    from cachequant.cli.main import main

    common = ["autotune", "--model", "tiny-ddim", "--steps", "4", "--intervals", "2", "--bits", "fp,w8a8",
              "--num-samples", "2", "--batch-size", "2", "--num-images", "2", "--schedule", "uniform", "--quiet"]
    out, table, plot = tmp_path / "best.cqplan", tmp_path / "t.json", tmp_path / "f.png"
    assert main(common + ["--min-psnr", "1", "--out", str(out), "--table", str(table), "--plot", str(plot)]) == 0
    rows = json.loads(table.read_text())["rows"]
    assert {(r["interval"], r["bits"]) for r in rows} == {(2, "fp"), (2, "w8a8")} and plot.stat().st_size > 0
    assert cq.load_plan(out).quant is not None  # the cheaper one by Bops: 8-bit
    # no candidate within budget: exit 1, one line saying so, no plan written
    assert main(common + ["--min-psnr", "500", "--out", str(tmp_path / "none.cqplan")]) == 1
    assert "no candidate reaches 500 dB" in capsys.readouterr().err and not (tmp_path / "none.cqplan").exists()
    assert main(common + ["--min-psnr", "20", "--bits", "w8a4", "--out", str(tmp_path / "x.cqplan")]) == 2
    assert "--bits: expected a comma-separated subset of fp,w8a8,w4a8" in capsys.readouterr().err
