"""Smoke tests of benchmarks/: each script runs end to end on a tiny budget and writes its
results JSON with the expected keys and finite numbers (timings are never asserted)."""

import json
import math
import pathlib
import re

import pytest
import torch

import common
import fit_8gaussians
import toy_race


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_header(saved, name):
    assert saved["benchmark"] == name
    for key in ("date", "torch", "threads", "device", "revision"):
        assert key in saved["machine"], key


def run_benchmark(module, out, *argv):
    """``module.main`` with ``argv`` and ``--out out``: the results file it wrote (its header checked)."""
    module.main(module.parser().parse_args([*argv, "--out", str(out)]))
    saved = json.loads(out.read_text())
    check_header(saved, module.__name__)
    return saved


@pytest.mark.parametrize("name", sorted(common.VARIANTS))
def test_variants_build(name):
    model = common.OurFFJORD(name, **common.VARIANTS[name])
    config = model.module.config
    fixed = re.search(r"rk4_(\d+)", name)  # rk4_4, ct_T1_rk4_4, rk4_4_rnode, ...: k fixed rk4 steps
    if fixed:
        assert config.solver == "rk4" and config.steps == int(fixed.group(1))
        assert config.step_size is None and config.eval_solver == "dopri5"
    else:  # adaptive dopri5, or 3 rk4 steps (the "fast" preset sets them, the default implies them)
        assert config.solver == "dopri5" or (config.solver == "rk4" and config.fixed_steps(0.5) == 3), name


def test_fit_8gaussians_smoke(tmp_path):
    out = tmp_path / "fit.json"
    argv = ["--iters", "2", "--batch-size", "32", "--test-size", "50", "--threads", "1", "--out", str(out)]
    payload = fit_8gaussians.main(fit_8gaussians.parser().parse_args(argv))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    check_header(saved, "fit_8gaussians")
    rows = {r["name"]: r for r in saved["results"]}
    assert set(rows) == {"ours (default)", 'ours (preset="fast")', "ours (reference config)", "zuko CNF"}
    for r in rows.values():
        assert finite(r["it_per_s"], r["speed_vs_reference"], r["nfe_forward_per_it"],
                      r["nfe_backward_per_it"], r["test_loglik"], r["final_train_loss"]), r["name"]
    assert rows['ours (preset="fast")']["nfe_forward_per_it"] == 12  # 3 rk4 steps, 4 evaluations each
    assert rows["ours (reference config)"]["nfe_backward_per_it"] > 0  # the adjoint solves backwards
    assert saved["table"].count("\n") == 1 + len(rows)


def test_toy_race_smoke(tmp_path):
    saved = run_benchmark(toy_race, tmp_path / "race.json", "--data", "pinwheel", "--iters", "2", "--max-iters", "2",
                          "--eval-every", "1", "--batch-size", "32", "--test-size", "50", "--variants", "rk4_4",
                          "--skip-zuko", "--threads", "1")
    (result,) = saved["results"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["reference", "default", "rk4_4"]
    assert result["target_nll"] == rows["reference"]["final_test_nll"]  # (a)'s NLL is the target
    for r in rows.values():
        assert r["iters"] == 2 and len(r["curve"]) == 2, r["variant"]
        assert finite(r["it_per_s"], r["nfe_forward_per_it"], r["nfe_backward_per_it"], r["final_test_nll"],
                      *(c["test_nll"] for c in r["curve"]))
    assert rows["rk4_4"]["nfe_forward_per_it"] == 16 and rows["rk4_4"]["options"]["steps"] == 4
    assert rows["reference"]["x_reference"] == 1.0
    assert "rk4_4" in result["table"]


def test_toy_race_without_reference_or_target(tmp_path):
    (result,) = run_benchmark(toy_race, tmp_path / "race.json", "--data", "8gaussians", "--max-iters", "1",
                              "--eval-every", "1", "--batch-size", "16", "--test-size", "20", "--skip-reference",
                              "--skip-zuko", "--threads", "1")["results"]
    assert result["target_nll"] is None and [r["variant"] for r in result["rows"]] == ["default"]
    assert result["rows"][0]["reached_target"] is None and finite(result["rows"][0]["final_test_nll"])


def test_dim_sweep_smoke(tmp_path):
    import dim_sweep

    real = dim_sweep.DATA_DIR
    dims = [2, 8] if (__import__("pathlib").Path(real) / "train-images-idx3-ubyte.gz").exists() else [2]
    saved = run_benchmark(dim_sweep, tmp_path / "sweep.json", "--seconds", "0.3", "--dims", *map(str, dims),
                          "--test-size", "50", "--threads", "1")
    assert [r["dim"] for r in saved["rows"]] == [d for d in dims for _ in range(3)]
    for row in saved["rows"]:
        assert row["iterations"] >= 1 and finite(row["test_nll"], row["seconds_per_iteration"])


def test_svi_race_smoke(tmp_path):
    import svi_race

    saved = run_benchmark(svi_race, tmp_path / "svi.json", "--steps", "2", "--lrs", "1e-2", "--eval-batches", "2",
                          "--eval-particles", "20")
    assert {(r["target"], r["guide"]) for r in saved["rows"]} == {
        (t, g) for t in svi_race.TARGETS for g in svi_race.GUIDES}
    for row in saved["rows"]:
        assert finite(row["kl"], row["kl_se"], row["train_seconds"], row["x_spline_time"])


def test_exact_eval_smoke(tmp_path):
    import exact_eval

    saved = run_benchmark(exact_eval, tmp_path / "exact.json", "--dims", "3", "--batch-size", "20",
                          "--min-seconds", "0.01")
    ways = {r["way"] for r in saved["rows"]}
    assert {"library default", "D VJPs in one vmap pass (before)", "forward mode (vmap jvp)", "zuko MAF"} <= ways
    for row in saved["rows"]:
        assert finite(row["ms_per_point"], row["x_fastest_exact"]) and row["ms_per_point"] > 0


def test_tabular_race_smoke(tmp_path):
    import tabular_race

    saved = run_benchmark(tabular_race, tmp_path / "tabular.json", "--seconds", "0.2", "--scores", "2",
                          "--batch-size", "16")
    assert saved["dim"] == 30 and len(saved["rows"]) == 6
    for row in saved["rows"]:
        assert row["iterations"] >= 1 and len(row["curve"]) == 2 and not row["diverged"]
        assert finite(row["test_nll_at_best_valid"], row["best_valid_nll"])


def test_tabular_race_records_a_diverged_flow(tmp_path):
    import tabular_race
    from pyro_ffjord.datasets import tabular

    class Diverging(tabular_race.Discrete):
        def loss(self, batch):
            with torch.no_grad():
                for p in self.module.parameters():
                    p.fill_(float("nan"))
            return super().loss(batch)

    args = tabular_race.parser().parse_args(["--seconds", "0.2", "--scores", "2", "--out", ""])
    row = tabular_race.race(Diverging("nan", 30, "affine"), tabular.load("breast_cancer"), args)
    assert row["diverged"]["iteration"] == 1 and row["iterations"] == 0
    assert math.isnan(row["test_nll_at_best_valid"])


def test_threads_smoke(tmp_path):
    import threads

    saved = run_benchmark(threads, tmp_path / "threads.json", "--dims", "2", "--seconds", "0.05")
    (row,) = saved["rows"]
    assert row["dim"] == 2 and finite(row["ms_1_thread"], row["ms_2_threads"], row["speedup_2_over_1"])


def test_flow_matching_smoke(tmp_path):
    import flow_matching

    out = tmp_path / "fm.json"
    flow_matching.main(flow_matching.parser().parse_args(
        ["--seconds", "0.2", "--scores", "2", "--test-size", "50", "--problems", "8gaussians", "--out", str(out)]))
    saved = json.loads(out.read_text())
    check_header(saved, "flow_matching")
    assert [r["objective"] for r in saved["rows"]] == ["mle", "mle", "fm", "fm", "fm, then mle"]
    for row in saved["rows"]:
        assert row["iterations"] >= 1 and len(row["curve"]) == 2 and finite(row["final_test_nll"])
    assert saved["rows"][0]["x_mle_time_to_target"] == 1.0
    assert saved["rows"][-1]["switch_seconds"] == 0.1


def test_flow_matching_scoring_times_are_geometric():
    import flow_matching

    times = flow_matching.scoring_times(64.0, 7)
    assert times[0] == pytest.approx(64.0 * 64 ** (-6 / 7)) and times[-1] == pytest.approx(64.0)
    ratios = [b / a for a, b in zip(times, times[1:])]
    assert ratios == pytest.approx([64 ** (1 / 7)] * 6)


@pytest.mark.skipif(not (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
                         / "train-images-idx3-ubyte.gz").exists(), reason="no MNIST copy")
def test_image_budget_smoke(tmp_path):
    import image_budget

    saved = run_benchmark(image_budget, tmp_path / "ib.json", "--seconds", "0.3", "--scores", "1", "--test-size", "2",
                          "--batch-size", "2", "--hidden", "4", "--scales", "2", "--blocks", "1", "--warmup-iters", "1",
                          "--probes", "1")
    assert [r["config"] for r in saved["rows"]] == ["paper", "fast"]
    for row in saved["rows"]:
        assert row["iterations"] >= 1 and finite(row["final_test_bpd"], row["seconds_per_iteration"])
        assert "PROJECTION" in row["projection"]["label"]
    assert (tmp_path / "ib.png").exists()


def test_distributed_cpu_smoke(tmp_path):
    import distributed_cpu

    saved = run_benchmark(distributed_cpu, tmp_path / "dc.json", "--examples", "toy", "--steps", "3")
    one, two = saved["rows"]
    assert (one["processes"], one["threads_per_process"], one["world_size"]) == (1, 2, 1)
    assert (two["processes"], two["threads_per_process"], two["world_size"]) == (2, 1, 2)
    assert two["per_rank_batch"] * 2 == one["per_rank_batch"] and one["steps"] == two["steps"] == 3
    assert finite(one["steps_per_second"], two["x_steps_per_second"], one["final_loss"], two["test"])
    # Same global batches and seed, the exact trace on a fixed grid: the same training up to rounding.
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
