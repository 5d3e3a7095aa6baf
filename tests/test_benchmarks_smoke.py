"""Smoke test of benchmarks/run.py: the quick digits run completes and writes a complete JSON.

No timing thresholds: latencies only have to be positive and every ratio field present.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
PSB_VARIANTS = ["psb_n1", "psb_n4", "psb_n8", "psb_n16", "psb_iid_n4", "psb_iid_n16", "psb_frozen_n8", "psb_int8_n8",
                "psb_int8_n8_new_draw", "psb_int8_frozen_n8"]
VARIANTS = PSB_VARIANTS + ["tvm_fp32", "ort_fp32", "ort_int8", "ov_fp32", "ov_int8"]
RATIOS = ["vs_ort_fp32", "vs_ort_int8", "vs_tvm_fp32", "vs_ov_int8"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = (ROOT / "BENCHMARKS.md").read_bytes() if (ROOT / "BENCHMARKS.md").exists() else None
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--models", "digits", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = (ROOT / "BENCHMARKS.md").read_bytes() if (ROOT / "BENCHMARKS.md").exists() else None
    return json.loads((out / "latest.json").read_text()), out, before == after


def test_every_variant_has_positive_latencies(quick_run):
    results, _, _ = quick_run
    digits = results["models"]["digits"]
    assert digits["errors"] == {}
    assert sorted(digits["latency_ms"]) == sorted(VARIANTS)
    for variant, lat in digits["latency_ms"].items():
        assert lat["repeats"] == 3 and len(lat["samples"]) == 3, variant
        assert all(s > 0 for s in lat["samples"]), variant
        assert 0 < lat["p10"] <= lat["median"] <= lat["p90"], variant


def test_ratio_fields(quick_run):
    results, _, _ = quick_run
    ratios = results["models"]["digits"]["ratios"]
    assert sorted(ratios) == sorted(PSB_VARIANTS)
    for variant in PSB_VARIANTS:
        for key in RATIOS:
            value = ratios[variant][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (variant, key)


def test_tuned_rows_next_to_default(quick_run):
    """``--tuned-from``: a tuning run's rows beside this run's, each latency also as a ratio to the
    ORT int8 / fp32 of its own run, with the module's tuning time."""
    sys.path.insert(0, str(RUN.parent))
    import run

    results, _, _ = quick_run
    tuned = json.loads(json.dumps(results))
    tuned["meta"]["tuning_trials"] = 8
    lat = tuned["models"]["digits"]["latency_ms"]
    lat["psb_int8_frozen_n8"]["median"] = 2 * lat["ort_int8"]["median"]
    tuned["models"]["digits"]["tuning_s"] = {"psb_int8_frozen_n8": 12.0}
    results = dict(results, tuned=tuned)
    md = run.markdown(results)
    assert "## Tuned: 8 MetaSchedule trials" in md
    row = next(line for line in md.splitlines() if line.startswith("| digits | psb_tvm int8 preset frozen n=8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "2.00" and cells[-1] == "12"  # tuned / ORT int8 of its own run; tuning seconds
    default = results["models"]["digits"]["latency_ms"]
    assert cells[3] == f"{default['psb_int8_frozen_n8']['median'] / default['ort_int8']['median']:.2f}"


def test_model_facts_and_report(quick_run):
    results, out, benchmarks_md_untouched = quick_run
    digits = results["models"]["digits"]
    assert digits["float_macs"] > 0 and digits["psb_additions_per_sample"] > 0
    assert set(digits["compile_s"]) >= {"psb", "psb_iid", "psb_frozen_n8", "psb_int8_n8", "psb_int8_frozen_n8", "tvm_fp32",
                                        "ort_fp32", "ort_int8", "ov_fp32", "ov_int8"}
    assert "| OpenVINO int8 (NNCF PTQ) |" in (out / "latest.md").read_text()
    assert set(digits["quality"]["top1_agreement_with_ort_fp32"]) == set(VARIANTS)
    assert results["meta"]["machine"]["threads_used"] == 2
    assert "| psb_tvm n=8 |" in (out / "latest.md").read_text()
    assert benchmarks_md_untouched  # --quick never rewrites the top-level BENCHMARKS.md


# ---------------------------------------------------------------------------- benchmarks/roofline.py
ROOFLINE = ROOT / "benchmarks" / "roofline.py"
ROOFLINE_ROW_FIELDS = {"layer", "preset", "path", "macs", "ms", "gmac_per_s", "fraction_of_peak", "sample_ms",
                       "q_stage_ms", "xq_stage_ms", "vpdpbusd_in_asm"}


@pytest.fixture(scope="module")
def roofline_quick(tmp_path_factory):
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("g++ not installed (the peak microbenchmark is compiled at run time)")
    out = tmp_path_factory.mktemp("roofline")
    proc = subprocess.run([sys.executable, str(ROOFLINE), "--quick", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "roofline.json").read_text()), out


def test_roofline_quick_json(roofline_quick):
    """--quick: one small layer, both presets; no timing thresholds, only sane fields and fractions."""
    result, out = roofline_quick
    assert result["errors"] == {}
    peak = result["peak"]
    assert "error" not in peak and peak["peak_gmac_per_s"] > 0 and peak["method"]
    assert {r["threads"] for r in peak["runs"]} == {1, 2} and {r["width"] for r in peak["runs"]} == {256, 512}
    assert result["meta"]["threads"] == 2 and "load_average_start" in result["meta"]
    rows = result["layers"]
    assert sorted(r["preset"] for r in rows) == ["int16", "int8"]
    for r in rows:
        assert ROOFLINE_ROW_FIELDS <= set(r), sorted(ROOFLINE_ROW_FIELDS - set(r))
        assert r["macs"] > 0 and r["ms"] > 0 and r["gmac_per_s"] > 0
        assert 0 < r["fraction_of_peak"] <= 1.5, r
        assert r["prepacked_ms"] > 0 and 0 < r["prepacked_fraction_of_peak"] <= 1.5, r  # frozen kernel, same bits
        assert r["nhwc_ms"] > 0 and 0 < r["nhwc_fraction_of_peak"] <= 1.5, r  # channels-last, same bits
    paths = {r["preset"]: r["path"] for r in rows}
    assert paths == {"int8": "vnni", "int16": "vnni16"}
    if "avx512_vnni" in result["meta"]["machine"]["simd"]:
        assert next(r for r in rows if r["preset"] == "int8")["vpdpbusd_in_asm"] > 0
    md = (out / "roofline.md").read_text()
    assert "Measured 2-thread peak" in md and "| quick 3x3 32ch 14x14 | int8 | vnni |" in md
