"""End to end on the bundled digits CNN: accuracy vs float and error shrinking with n."""

import pytest

from psb_tvm.demo import digits_study


@pytest.fixture(scope="module")
def study():
    return digits_study(samples=(1, 4, 16, 64), batch=90, seed=0)


def test_accuracy_at_16_samples_within_one_point_of_float(study):
    rows = {r["samples"]: r for r in study["rows"]}
    assert rows["float"]["accuracy"] > 0.97  # the bundled model itself is good
    assert rows[16]["accuracy"] >= rows["float"]["accuracy"] - 0.01


def test_output_error_shrinks_as_n_grows(study):
    err = [r["rel_error"] for r in study["rows"] if r["samples"] != "float"]
    assert all(a > b for a, b in zip(err, err[1:])), err
    # Sampling noise falls like 1/sqrt(n): 64x the samples should cut the error by well over 3x.
    assert err[-1] < err[0] / 3, err
    agreement = [r["agreement"] for r in study["rows"] if r["samples"] != "float"]
    assert agreement[-1] > 0.98 and agreement[0] < agreement[-1]


def test_all_layers_became_psb(study):
    layers = study["modules"][16].layers
    assert [l["status"] for l in layers] == ["psb"] * 5
    assert [l["op"] for l in layers] == ["conv2d"] * 3 + ["dense"] * 2
    assert layers[0]["name"] == "/conv1/Conv"
