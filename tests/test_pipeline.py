"""The declared pipeline and its passes: each PSB pass on its own (what it adds, removes, refuses),
the registered ``psb_cpu`` / ``psb_cuda`` pipelines in a user's own flow, and the import graph
(no function-local import of psb_tvm's own modules)."""

import ast
import json
import pathlib

import numpy as np
import onnx_models
import pytest
import tvm
from psb_tvm.passes import (
    AssertSampleBounds,
    AttachPSBMetadata,
    ExposeLayerInputs,
    RewriteToPSB,
    ScalarMinMaxCallTIRToRelaxOps,
    SimulatePSBLayers,
    find_layer_sites,
)
from tvm import relax, tirx

import psb_tvm
from psb_tvm import pipeline
from psb_tvm.abi import METADATA_FUNC
from psb_tvm.compiler import plan
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.frontend import import_onnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"input": (4, 1, 8, 8)}


@pytest.fixture(scope="module")
def digits_plan():
    x_train, _, x_test, _ = load_digits_split()
    return plan(DIGITS_ONNX, input_shapes=SHAPES, calibration={"input": x_train[:64]}), x_test[:4]


def _relax_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)}


def _prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


@tvm.instrument.pass_instrument
class RecordPasses:
    def __init__(self):
        self.names = []

    def run_before_pass(self, _mod, info):
        self.names.append(info.name)


# ---------------------------------------------------------------------------- single passes
def test_rewrite_to_psb_adds_the_sampled_functions_and_their_kernels(digits_plan):
    p, _ = digits_plan
    mod = RewriteToPSB(p.layers)(p.imported.mod)
    funcs = _relax_funcs(mod)
    assert set(funcs) == {"main", "forward", "probe", "attend", "weights", "cached", "sample"}
    main = funcs["main"]
    assert [v.name for v in main.params] == ["input", "samples", "seed"]
    kinds = [(f.attrs or {}).get("psb.kind") for f in _prim_funcs(mod).values()]
    assert kinds.count("conv2d") == 3 and kinds.count("dense") == 2
    # no float conv / matmul of a PSB layer is left in main
    assert "conv2d" not in main.script() and "matmul" not in main.script()


def test_rewrite_to_psb_frozen_keeps_only_main_on_constant_weights(digits_plan):
    p, _ = digits_plan
    counts = [psb_tvm.numerics.sample_counts(l.enc, 4, 0, l.site_index, p.config.sampler) for l in p.layers]
    mod = RewriteToPSB(p.layers, {"counts": counts, "samples": [4] * len(p.layers)})(p.imported.mod)
    assert set(_relax_funcs(mod)) == {"main"}
    assert [v.name for v in mod["main"].params] == ["input"]
    assert not any((f.attrs or {}).get("psb.kind") == "sample" for f in _prim_funcs(mod).values())


def test_rewrite_to_psb_refuses_layers_planned_on_another_module(digits_plan):
    p, _ = digits_plan
    other = import_onnx(onnx_models.conv_model(), None).mod
    with pytest.raises(ValueError, match="does not match site .* plan the layers on the module you rewrite"):
        RewriteToPSB(p.layers)(other)
    assert RewriteToPSB([])(other).same_as(other)  # nothing to rewrite: unchanged


def test_expose_layer_inputs_returns_the_chosen_sites_inputs(digits_plan):
    p, _ = digits_plan
    mod = ExposeLayerInputs([0, 3])(p.imported.mod)
    ret = mod["main"].ret_ty
    shapes = [tuple(int(d) for d in f.shape.values) for f in ret.fields]
    assert shapes == [(4, 1, 8, 8), (4, 512)]
    with pytest.raises(ValueError, match=r"no linear-layer sites \[9\]"):
        ExposeLayerInputs([9])(p.imported.mod)


def test_simulate_psb_layers_takes_weights_and_rounding_at_run_time(digits_plan):
    p, _ = digits_plan
    mod = SimulatePSBLayers(p.layers)(p.imported.mod)
    main = mod["main"]
    assert [v.name for v in main.params] == ["input", "act"] + [f"w_{l}" for l in range(5)]
    assert len(main.ret_ty.fields) == 1 + 2 * 5  # output, then (input, output) per layer
    assert not any("psb.kind" in (f.attrs or {}) for f in _prim_funcs(mod).values())


def test_scalar_minmax_pass_turns_clip_call_tir_into_relax_ops():
    raw = tvm.relax.frontend.onnx.from_onnx(onnx_models.mobile_block_model(), shape_dict={"x": [1, 3, 16, 16]})
    raw = relax.transform.FoldConstant()(raw)
    before = raw["main"].script()
    after = relax.transform.DeadCodeElimination()(ScalarMinMaxCallTIRToRelaxOps()(raw))["main"].script()
    assert before.count("R.call_tir") > after.count("R.call_tir")
    assert "R.minimum" in after and "R.maximum" in after


def test_assert_sample_bounds_and_attach_metadata(digits_plan):
    p, _ = digits_plan
    mod = RewriteToPSB(p.layers)(p.imported.mod)
    checked = AssertSampleBounds(64)(mod)
    layer = next(f for f in _prim_funcs(checked).values() if (f.attrs or {}).get("psb.kind") == "conv2d")
    assert "n must be a power of two <= n_max 64" in layer.script()
    metadata = {"n_max": 64}
    out = AttachPSBMetadata(metadata)(checked)
    text = out[METADATA_FUNC].body.body.value
    assert json.loads(text)["schedules"] == metadata["schedules"]  # the caller's dict is updated too
    assert metadata["schedules"]["tuned"] == 0 and metadata["schedules"]["default"] == len(_prim_funcs(out))


# ---------------------------------------------------------------------------- the pipeline
def test_pipelines_are_registered_and_run_under_pass_instruments(digits_plan):
    """A user's own flow: TVM's pass infrastructure sees every PSB pass, and the registered
    ``psb_cpu`` pipeline builds a module that equals ``psb_tvm.compile``'s bit for bit."""
    p, x = digits_plan
    assert {"psb_cpu", "psb_cuda"} <= set(relax.pipeline.PIPELINE_MAP)
    record = RecordPasses()
    with tvm.transform.PassContext(opt_level=3, instruments=[record]):
        mod = tvm.transform.Sequential(pipeline.rewrite_passes(p.layers))(p.imported.mod)
        ex = tvm.compile(mod, target=p.target,
                         relax_pipeline=relax.get_pipeline("psb_cpu", target=p.target, n_max=p.config.n_max))
    names = record.names
    order = [names.index(n) for n in ("RewriteToPSB", "psb_cpu", "ApplyDefaultSchedule", "AssertSampleBounds")]
    assert order == sorted(order), names
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.ShapeTuple([8] * 5), tvm.runtime.ShapeTuple([2])).numpy()
    want = psb_tvm.compile(DIGITS_ONNX, input_shapes=SHAPES, calibration={"input": load_digits_split()[0][:64]}).run(
        x, samples=8, seed=2)
    np.testing.assert_array_equal(got, want)


def test_rewrite_phase_hands_off_after_the_rewrite(digits_plan):
    p, _ = digits_plan
    assert [type(x).__name__ for x in pipeline.rewrite_passes(p.layers)] == ["RewriteToPSB", "HandOffInt8Activations",
                                                                             "FuseResidualAdd", "ChannelsLastFloat"]


def test_cpu_and_cuda_pipelines_list_their_phases_in_order():
    cpu = [type(p).__name__ if not hasattr(p, "info") else p.info.name
           for p in pipeline.cpu_build_passes(tvm.target.Target("llvm"), metadata={"n_max": 16})]
    assert cpu.index("LegalizeOps") < cpu.index("ApplyDefaultSchedule") < cpu.index("AssertSampleBounds") \
        < cpu.index("AttachPSBMetadata") < cpu.index("VMShapeLower")
    cuda = [p.info.name for p in pipeline.cuda_build_passes(tvm.target.Target("cuda"), metadata={"n_max": 16})]
    # our GPU rules see the PSB kernels before TVM legalizes and schedules the float glue
    assert cuda.index("ApplyDefaultSchedule") < cuda.index("AttachPSBMetadata") < cuda.index("LegalizeOps")
    assert cuda[-1] == "WithPassConfig"  # finalization (RewriteCUDAGraph) under the CUDA-graph option


def test_plan_of_a_relax_module_names_layers_by_position():
    mod = tvm.relax.frontend.onnx.from_onnx(onnx_models.conv_model(), shape_dict={"x": [1, 4, 10, 10]})
    mod = tvm.transform.Sequential(pipeline.import_passes())(mod)
    x = np.random.default_rng(0).normal(size=(8, 4, 10, 10)).astype(np.float32)
    p = plan(mod, calibration={"x": x})
    assert [l.name for l in p.layers] == ["conv2d_0"] and p.imported.inputs == [("x", (1, 4, 10, 10), "float32")]
    with pytest.raises(psb_tvm.ConfigError, match="input_shapes applies to ONNX models"):
        plan(mod, input_shapes={"x": (1, 4, 10, 10)})
    assert len(find_layer_sites(mod["main"])) == 1


# ---------------------------------------------------------------------------- import graph
def _local_internal_imports(path: pathlib.Path) -> list:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.level > 0 or (sub.module or "").startswith("psb_tvm")):
                    found.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    return found


def test_no_function_local_import_of_psb_tvm_modules():
    """Dependencies flow one way (DESIGN.md, architecture): psb_tvm's own modules import each other
    at module level only, so a cycle fails at import instead of hiding in a function."""
    files = sorted((ROOT / "psb_tvm").glob("*.py")) + sorted((ROOT / "passes").glob("*.py"))
    assert [hit for f in files for hit in _local_internal_imports(f)] == []


def _module_graph() -> dict:
    """psb_tvm module -> the psb_tvm modules it imports at module level (packages as one node)."""
    roots = {"psb_tvm": ROOT / "psb_tvm", "psb_tvm.passes": ROOT / "passes", "psb_tvm.schedules": ROOT / "schedules"}
    graph = {}
    for pkg, folder in roots.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            node = name if pkg == "psb_tvm" else pkg  # passes/ and schedules/ are one layer each
            base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            deps = graph.setdefault(node, set())
            for stmt in ast.parse(path.read_text()).body:
                if isinstance(stmt, ast.ImportFrom):
                    if stmt.level:
                        target = base.rsplit(".", stmt.level - 1)[0] if stmt.level > 1 else base
                        target = f"{target}.{stmt.module}" if stmt.module else target
                    else:
                        target = stmt.module or ""
                    names = [target] if stmt.module or not stmt.level else [f"{target}.{a.name}" for a in stmt.names]
                    for t in names:
                        if not t.startswith("psb_tvm"):
                            continue
                        for layer in ("psb_tvm.passes", "psb_tvm.schedules"):
                            if t.startswith(layer):
                                t = layer
                        if t == "psb_tvm":  # "from psb_tvm import numerics"
                            t = "psb_tvm." + stmt.names[0].name
                        if t != node and t != "psb_tvm.data":
                            deps.add(t)
    return graph


def test_psb_tvm_modules_import_each_other_without_cycles():
    graph = _module_graph()
    order, state = [], {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep in graph:
                visit(dep, path + [node])
        state[node] = "done"
        order.append(node)

    for node in sorted(graph):
        if node != "psb_tvm":  # the package __init__ imports the public API from everything
            visit(node, [])
    # the layers of DESIGN.md section 7, spot-checked: nothing below reaches what is above it

    def reachable(node):
        seen, todo = set(), [node]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    for low, high in [("psb_tvm.config", "psb_tvm.schedules"), ("psb_tvm.passes", "psb_tvm.build"),
                      ("psb_tvm.pipeline", "psb_tvm.tuning_db"), ("psb_tvm.build", "psb_tvm.calibration"),
                      ("psb_tvm.runtime", "psb_tvm.compiler"), ("psb_tvm.datasets", "psb_tvm.allocate"),
                      ("psb_tvm.allocate", "psb_tvm.evaluate"), ("psb_tvm.evaluate", "psb_tvm.cli")]:
        assert high not in reachable(low), f"{low} reaches {high}"
    assert "psb_tvm.numerics" in reachable("psb_tvm.cli") and "psb_tvm.passes" in reachable("psb_tvm.compiler")
