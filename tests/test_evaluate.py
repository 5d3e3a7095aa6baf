"""psb_tvm.evaluate: input sets, metrics vs n, attention and allocation points, JSON/markdown/PNG."""

import json
import sys

import numpy as np
import pytest

import psb_tvm
from psb_tvm import InputError
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.evaluate import Preprocess, load_inputs

SHAPES = {"input": (50, 1, 8, 8)}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = load_digits_split()
    module = psb_tvm.compile(DIGITS_ONNX, samples=8, input_shapes=SHAPES, calibration={"input": x_train[:256]})
    ref = psb_tvm.compile(DIGITS_ONNX, samples=1, input_shapes=SHAPES, config=psb_tvm.PSBConfig(include=()))
    return {"module": module, "ref": ref, "x_train": x_train, "x": x_test[:200], "y": y_test[:200]}


def test_evaluate_digits_writes_json_markdown_and_plots(digits, tmp_path):
    rep = psb_tvm.evaluate(digits["module"], digits["x"], digits["y"], samples=[1, 4, 16], reference=digits["ref"],
                           allocate=True, allocation_inputs=digits["x_train"][:150], allocation_seeds=(0,),
                           out_dir=tmp_path, progress=False)
    assert rep.metric == "accuracy" and rep.float_row["metric"] > 0.95
    assert [r["samples"] for r in rep.rows] == [1, 4, 16]
    by_n = {r["samples"]: r for r in rep.rows}
    assert by_n[16]["metric"] > by_n[1]["metric"] and by_n[16]["rel_error"] < by_n[1]["rel_error"]
    assert by_n[16]["additions"] == digits["module"].cost(16)["additions"] == 16 * by_n[1]["additions"]
    # attention: between the low pass and the full high pass in cost
    assert rep.attention and all(by_n[1]["additions"] < r["additions"] <= 1.001 * by_n[16]["additions"] + by_n[1]["additions"]
                                 for r in rep.attention)
    # allocations at the errors of uniform n=4 and n=16 (fitted on other data): no more cost than uniform
    assert [r["matches_uniform_n"] for r in rep.allocated] == [4, 16]
    for r in rep.allocated:
        assert r["additions"] <= r["uniform_additions"]
        assert set(r["samples"]) == set(digits["module"].psb_layers)
    files = {k: tmp_path / v.split("/")[-1] for k, v in rep.files.items()}
    assert set(files) == {"json", "markdown", "plot_n", "plot_cost"}
    data = json.loads(files["json"].read_text())
    assert data["rows"][2]["samples"] == 16 and data["meta"]["psb_layers"] == digits["module"].psb_layers
    md = files["markdown"].read_text()
    assert "| uniform | 16 |" in md and "allocated" in md and "attention" in md
    for key in ("plot_n", "plot_cost"):
        assert files[key].read_bytes()[:8] == PNG


def test_without_labels_reports_agreement_and_skips_plots_without_matplotlib(digits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: as if not installed
    with pytest.warns(UserWarning, match="matplotlib"):
        rep = psb_tvm.evaluate(digits["module"], {"input": digits["x"][:100]}, samples=[2, 8], attention=False,
                               reference=digits["ref"], out_dir=tmp_path, progress=False)
    assert rep.metric == "agreement" and not rep.attention and not rep.allocated
    assert rep.rows[1]["metric"] == rep.rows[1]["agreement"] >= rep.rows[0]["agreement"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md"]


def test_custom_metric_and_seeds(digits):
    def top2(output, labels):
        return float(np.mean((np.argsort(-output, axis=1)[:, :2] == labels[:, None]).any(axis=1)))

    rep = psb_tvm.evaluate(digits["module"], digits["x"][:100], digits["y"][:100], metric=top2, samples=[2],
                           seeds=(0, 1, 2), attention=False, reference=digits["ref"], progress=False)
    assert rep.metric == "top2" and "metric_std" in rep.rows[0]
    assert rep.rows[0]["metric"] >= rep.rows[0]["agreement"] - 0.2


def test_load_inputs_from_folders_npz_and_loaders(tmp_path):
    from PIL import Image

    specs = [("input", (50, 1, 8, 8), "float32")]
    rng = np.random.default_rng(0)
    # class folders of images -> labels from the folder names
    for label in (3, 7):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.uniform(0, 255, (16, 16))).astype(np.uint8)).save(tmp_path / "imgs" / str(label) / f"{i}.png")
    data, labels, _ = load_inputs(tmp_path / "imgs", specs, Preprocess(mean=(0.5,), std=(0.25,)))
    assert data["input"].shape == (4, 1, 8, 8) and data["input"].dtype == np.float32
    assert labels.tolist() == [3, 3, 7, 7]
    assert -2.01 <= data["input"].min() and data["input"].max() <= 2.01
    # a folder of .npy samples
    (tmp_path / "npys").mkdir()
    for i in range(3):
        np.save(tmp_path / "npys" / f"{i}.npy", np.full((1, 8, 8), i, np.float64))
    data, labels, _ = load_inputs(tmp_path / "npys", specs)
    assert data["input"].shape == (3, 1, 8, 8) and labels is None and data["input"][2, 0, 0, 0] == 2
    # .npz with a labels key
    np.savez(tmp_path / "set.npz", input=np.zeros((5, 1, 8, 8), np.float32), labels=np.arange(5))
    data, labels, _ = load_inputs(tmp_path / "set.npz", specs)
    assert data["input"].shape == (5, 1, 8, 8) and labels.tolist() == [0, 1, 2, 3, 4]
    # a loader yielding (x, y) batches
    data, labels, _ = load_inputs(lambda: ((np.ones((2, 1, 8, 8)), np.array([1, 2])) for _ in range(3)), specs)
    assert data["input"].shape == (6, 1, 8, 8) and labels.tolist() == [1, 2] * 3


def test_load_inputs_errors_name_the_input(tmp_path):
    specs = [("input", (50, 1, 8, 8), "float32")]
    with pytest.raises(InputError, match="nope"):
        load_inputs(tmp_path / "nope", specs)
    with pytest.raises(InputError, match=r"expected samples of shape \(1, 8, 8\)"):
        load_inputs(np.zeros((4, 3, 8, 8)), specs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .npy or image files"):
        load_inputs(tmp_path / "empty", specs)
    with pytest.raises(InputError, match="3 labels for 4 inputs"):
        load_inputs((np.zeros((4, 1, 8, 8)), np.zeros(3)), specs)
    with pytest.raises(psb_tvm.ConfigError, match="needs labels"):
        psb_tvm.evaluate(DIGITS_ONNX, np.zeros((4, 1, 8, 8), np.float32), metric="accuracy",
                         input_shapes={"input": (4, 1, 8, 8)}, progress=False)
