"""Automatic per-layer sample allocation (psb_tvm.allocate) and per-layer compile-time defaults."""

import numpy as np
import onnx_models
import pytest

import psb_tvm
from psb_tvm import ConfigError
from psb_tvm.allocate import greedy_path, sensitivity
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.evaluate import rel_error, run_dataset

SHAPES = {"input": (50, 1, 8, 8)}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = load_digits_split()
    module = psb_tvm.compile(DIGITS_ONNX, samples=8, input_shapes=SHAPES, calibration={"input": x_train[:256]})
    ref = psb_tvm.compile(DIGITS_ONNX, samples=1, input_shapes=SHAPES, config=psb_tvm.PSBConfig(include=()))
    fit = x_train[:200]
    sens = sensitivity(module, fit, reference=ref, seeds=SEEDS)
    return {"module": module, "ref": ref, "fit": fit, "fit_y": y_train[:200], "x_test": x_test, "y_test": y_test,
            "sens": sens, "ref_test": run_dataset(ref, {"input": x_test})}


def test_sensitivity_table_is_monotone_and_path_falls_in_cost(digits):
    sens = digits["sens"]
    assert sens.layers == digits["module"].psb_layers and sens.n_ref == 64
    for layer in sens.layers:
        values = [sens.delta_sq[layer][n] for n in sorted(sens.delta_sq[layer])]
        assert all(a >= b >= 0 for a, b in zip(values, values[1:])), layer  # more samples, less added error
        assert values[-1] == 0.0
    path = greedy_path(sens)
    costs = [digits["module"].cost(p)["additions"] for p in path]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert all(n == 64 for n in path[0].values()) and all(n == 1 for n in path[-1].values())


@pytest.mark.parametrize("budget", [0.15, 0.3])
def test_error_budget_met_on_held_out_data_cheaper_than_uniform(digits, budget):
    m = digits["module"]
    a = psb_tvm.allocate(m, digits["fit"], budget=budget, reference=digits["ref"], seeds=SEEDS,
                         sensitivity_table=digits["sens"])
    assert a.feasible and a.measured_error <= budget
    assert set(a.samples) == set(m.psb_layers)
    assert a.cost == m.cost(a.samples)["additions"]
    # the cheapest uniform n meeting the same budget on the same data costs more
    assert a.uniform is not None and a.uniform["error"] <= budget
    assert a.cost < a.uniform["cost"]
    # held out: the test split, other seeds; the allocation's error stays near its budget
    errs = [rel_error(run_dataset(m, {"input": digits["x_test"]}, samples=a.samples, seed=s), digits["ref_test"])
            for s in (10, 11, 12)]
    assert np.mean(errs) <= 1.15 * budget, (errs, a.samples)
    assert "cost" in a.report() and a.to_dict()["savings_vs_uniform"] > 0


def test_accuracy_and_cost_budgets(digits):
    m = digits["module"]
    a = psb_tvm.allocate(m, digits["fit"], budget=0.02, kind="accuracy", labels=digits["fit_y"],
                         reference=digits["ref"], seeds=SEEDS, sensitivity_table=digits["sens"])
    ref_acc = float((run_dataset(digits["ref"], {"input": digits["fit"]})[0].argmax(1) == digits["fit_y"]).mean())
    assert a.measured_accuracy >= ref_acc - 0.02
    assert a.cost <= a.uniform["cost"]
    budget = m.cost(4)["additions"]
    c = psb_tvm.allocate(m, digits["fit"], budget=budget, kind="cost", reference=digits["ref"], seeds=SEEDS,
                         sensitivity_table=digits["sens"])
    assert c.feasible and c.cost <= budget
    # at the cost of uniform n=4 the allocation has less error than uniform n=4
    assert c.measured_error < c.uniform["error"] and c.uniform["samples"] == 4


def test_metric_budget_uses_the_task_score(digits):
    """A decision metric (top-1 agreement with the float model) in place of labels: the allocation
    meets it, and the scores the metric saw are exactly the agreement of those runs."""
    m, ref = digits["module"], digits["ref"]
    float_top1 = run_dataset(ref, {"input": digits["fit"]})[0].argmax(1)
    calls = []

    def agreement(outputs):
        calls.append(len(outputs))
        return float((outputs[0].argmax(1) == float_top1).mean())

    a = psb_tvm.allocate(m, digits["fit"], budget=0.02, kind="accuracy", metric=agreement, reference=ref,
                         seeds=SEEDS, sensitivity_table=digits["sens"])
    assert calls and all(c == 1 for c in calls)  # one output tensor per run
    assert a.feasible and a.measured_accuracy >= 1.0 - 0.02  # the reference agrees with itself
    runs = [agreement(run_dataset(m, {"input": digits["fit"]}, samples=a.samples, seed=s)) for s in SEEDS]
    assert a.measured_accuracy == pytest.approx(float(np.mean(runs)))
    assert a.cost <= a.uniform["cost"] < m.cost(64)["additions"]
    with pytest.raises(ConfigError, match="metric must return a number"):
        psb_tvm.allocate(m, digits["fit"], budget=0.02, kind="accuracy", metric=lambda out: "high",
                         reference=ref, seeds=SEEDS, sensitivity_table=digits["sens"])
    with pytest.raises(ConfigError, match="metric applies to kind='accuracy'"):
        psb_tvm.allocate(m, digits["fit"], budget=0.1, kind="error", metric=agreement, reference=ref)


def test_infeasible_budget_recommends_keeping_layers_float(digits):
    a = psb_tvm.allocate(digits["module"], digits["fit"], budget=1e-4, reference=digits["ref"], seeds=SEEDS,
                         sensitivity_table=digits["sens"])
    assert not a.feasible and a.recommend_exclude
    assert set(a.recommend_exclude) <= set(digits["module"].psb_layers)
    assert all(n == 64 for n in a.samples.values())
    assert "keep float" in a.report()


def test_bad_arguments(digits):
    m = digits["module"]
    with pytest.raises(ConfigError, match="kind"):
        psb_tvm.allocate(m, digits["fit"], budget=0.1, kind="latency")
    with pytest.raises(ConfigError, match="labels or a metric"):
        psb_tvm.allocate(m, digits["fit"], budget=0.01, kind="accuracy")
    with pytest.raises(ConfigError, match="budget"):
        psb_tvm.allocate(m, digits["fit"], budget=-1)
    with pytest.raises(psb_tvm.InputError, match="expected samples of shape"):
        psb_tvm.allocate(m, np.zeros((10, 3, 8, 8), np.float32), budget=0.1)


def test_per_layer_default_samples_baked_at_compile_time():
    model = onnx_models.small_cnn(batch=2)
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    calib = {"x": np.random.default_rng(1).standard_normal((8, 3, 12, 12)).astype(np.float32)}
    per_layer = {"conv1": 32, "fc": 1, "default": 4}
    m = psb_tvm.compile(model, samples=per_layer, calibration=calib)
    assert m.metadata["samples"] == 4
    assert m.metadata["layer_samples"] == {"conv1": 32, "conv2": 4, "dwconv": 4, "pwconv": 4, "fc": 1}
    assert m.resolve_samples(None) == [32, 4, 4, 4, 1]
    assert m.resolve_samples({"conv2": 8}) == [32, 8, 4, 4, 1]  # unnamed layers keep their compiled n
    assert np.array_equal(m.run(x), m.run(x, samples=per_layer))
    assert not np.array_equal(m.run(x), m.run(x, samples=4))
    assert "conv1=32" in m.report()
    frozen = psb_tvm.compile(model, samples=per_layer, calibration=calib, frozen=True)
    assert np.array_equal(frozen.run(x), m.run(x))
    with pytest.raises(ConfigError, match="frozen"):
        frozen.run(x, samples=4)
    with pytest.raises(ConfigError, match="conv9"):
        psb_tvm.compile(model, samples={"conv9": 4}, calibration=calib)
    with pytest.raises(ConfigError, match="power of two"):
        psb_tvm.compile(model, samples={"conv1": 3}, calibration=calib)
