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
VARIANTS = ["psb_n1", "psb_n4", "psb_n8", "psb_n16", "psb_frozen_n8", "psb_int8_n8", "tvm_fp32", "ort_fp32", "ort_int8"]
PSB_VARIANTS = VARIANTS[:6]
RATIOS = ["vs_ort_fp32", "vs_ort_int8", "vs_tvm_fp32"]


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


def test_model_facts_and_report(quick_run):
    results, out, benchmarks_md_untouched = quick_run
    digits = results["models"]["digits"]
    assert digits["float_macs"] > 0 and digits["psb_additions_per_sample"] > 0
    assert set(digits["compile_s"]) >= {"psb", "psb_frozen_n8", "psb_int8_n8", "tvm_fp32", "ort_fp32", "ort_int8"}
    assert set(digits["quality"]["top1_agreement_with_ort_fp32"]) == set(VARIANTS)
    assert results["meta"]["machine"]["threads_used"] == 2
    assert "| psb_tvm n=8 |" in (out / "latest.md").read_text()
    assert benchmarks_md_untouched  # --quick never rewrites the top-level BENCHMARKS.md
