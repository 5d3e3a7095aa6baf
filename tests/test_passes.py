"""Layer selection and the PSB rewrite on Relax: fused epilogues, batch-norm folding, names; the
float glue's GEMV rule."""

import numpy as np
import pytest
import tvm
from onnx_models import conv_model, handoff_model, resnet_stem_model, small_cnn
from psb_tvm.passes import find_layer_sites, name_sites
from psb_tvm.schedules.cpu import GEMV
from tvm import relax
from tvm.s_tir import dlight

import psb_tvm
from psb_tvm import compiler, numerics
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.frontend import import_onnx
from psb_tvm.target import host_target
from psb_tvm.tuning import legalize


def _sites(imported):
    sites = find_layer_sites(imported.mod["main"])
    name_sites(sites, imported.layer_names)
    return sites


def test_digits_sites_fuse_bias_and_relu_and_carry_onnx_names():
    imported = import_onnx(DIGITS_ONNX, {"input": (2, 1, 8, 8)})
    sites = _sites(imported)
    assert [s.name for s in sites] == ["/conv1/Conv", "/conv2/Conv", "/conv3/Conv", "/fc1/Gemm", "/fc2/Gemm"]
    assert [s.activation for s in sites] == ["relu"] * 4 + [None]
    assert all(s.bias is not None for s in sites)
    assert sites[3].weight.shape == (64, 512)  # dense weights are stored [out, in]


def test_unfolded_batch_norm_is_folded_into_the_conv_by_layer_selection():
    """Without onnxsim the importer leaves conv -> bias -> (x-m)/s*g+b chains; selection folds them."""
    raw = import_onnx(DIGITS_ONNX, {"input": (2, 1, 8, 8)}, use_onnxsim=False)
    assert "subtract" in raw.mod.script()  # the decomposed batch norm is really there
    simp = import_onnx(DIGITS_ONNX, {"input": (2, 1, 8, 8)})
    for a, b in zip(_sites(raw), _sites(simp)):
        assert a.activation == b.activation
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-5)


def test_bn_between_relu_and_next_layer_stays_float_glue():
    imported = import_onnx(small_cnn(), None)
    sites = _sites(imported)
    assert sites[0].name == "conv1" and sites[0].activation == "relu" and sites[0].bias is not None


def test_compiled_digits_matches_the_reference_model_layer_by_layer():
    """The whole compiled net equals a numpy re-implementation built from the reference ops."""
    x_train, _, x_test, _ = load_digits_split()
    n, seed = 8, 5
    module = psb_tvm.compile(DIGITS_ONNX, samples=n, seed=seed, input_shapes={"input": (10, 1, 8, 8)},
                             calibration={"input": x_train[:100]})
    imported = import_onnx(DIGITS_ONNX, {"input": (10, 1, 8, 8)})
    sites = _sites(imported)
    info = module.layers
    x = x_test[:10]

    def layer(i, h):
        s, li = sites[i], info[i]
        enc = numerics.encode_weights(s.weight)
        q = numerics.integer_weights(enc, n, seed, s.index)
        signed = li["act_dtype"].startswith("int")
        xi = numerics.quantize_activations(h, li["frac_bits"], 8, signed)
        if s.kind == "conv2d":
            acc = numerics.conv2d_int(xi, q, padding=(1, 1, 1, 1))
        else:
            acc = numerics.dense_int(xi, q)
        return numerics.epilogue(acc, numerics.output_scale(enc.k_lo, li["frac_bits"], n), s.bias, s.activation, 1)

    h = layer(1, layer(0, x))
    h = h.reshape(10, 32, 4, 2, 4, 2).max(axis=(3, 5))  # 2x2 max pool
    h = layer(2, h).reshape(10, 512)
    y = layer(4, layer(3, h))
    out = module.run(x)
    np.testing.assert_array_equal(out.view(np.int32), y.view(np.int32))


def _conv_clip_model(bounds, rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "W")]
    names = []
    for name, value in zip(("lo", "hi"), bounds):
        names.append("" if value is None else name)
        if value is not None:
            inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Clip", ["c"] + names, ["y"], name="relu6")],
        "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("bounds, fused", [((0.0, 6.0), ["clip", 0.0, 6.0]), ((-1.0, 0.5), ["clip", -1.0, 0.5]),
                                           ((0.0, None), "relu"), ((None, 6.0), None)])
def test_onnx_clip_is_fused_into_the_psb_kernel(bounds, fused):
    """The importer emits ONNX Clip (ReLU6) as call_tir of max / min PrimFuncs; the frontend turns
    them back into Relax ops so layer selection fuses them into the kernel (no float glue left)."""
    rng = np.random.default_rng(0)
    model = _conv_clip_model(bounds, rng)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    imported = import_onnx(model, None)
    script = imported.mod["main"].script()
    assert "call_tir" not in script
    module = psb_tvm.compile(model, samples=8, calibration={"x": x})
    layer = module.layers[0]
    assert layer["status"] == "psb"
    assert (list(layer["activation"]) if isinstance(layer["activation"], (list, tuple)) else layer["activation"]) == fused
    y = module.run(x[:1])
    lo, hi = (-np.inf if bounds[0] is None else bounds[0]), (np.inf if bounds[1] is None else bounds[1])
    assert y.min() >= lo and y.max() <= hi
    # The same numbers as the unfused epilogue: PSB conv without activation, then numpy's clip.
    bare = psb_tvm.compile(_conv_clip_model((None, None), np.random.default_rng(0)), samples=8,
                           calibration={"x": x})
    np.testing.assert_array_equal(y, np.clip(bare.run(x[:1]), lo, hi))


@pytest.mark.parametrize("in_ch, takes_gemv", [(96, False), (128, True)])
def test_float_gemv_rule_declines_predicated_tiles(in_ch, takes_gemv):
    """A float 1x1 conv on a 1x1 map is a GEMV. TVM's dlight GEMV rule tiles the reduction by 64:
    with 96 input channels that needs a predicate inside the vectorized loop, which took LLVM more
    than 10 minutes to compile (PP-OCR's detector). Our GEMV rule declines it (the reduction rule
    takes over); divisible extents keep TVM's schedule."""
    tgt = host_target()
    model = conv_model(in_ch=in_ch, out_ch=384, kernel=1, pad=0, hw=1, relu=False)
    mod = legalize(import_onnx(model).mod, tgt)
    (func,) = [f for gv, f in mod.functions.items() if "conv2d" in gv.name_hint]
    with tgt:
        tvm_sch = dlight.cpu.GEMV().apply(func, tgt, False)
        ours = GEMV().apply(func, tgt, False)
    assert tvm_sch is not None and ("T.where(" in tvm_sch.mod["main"].script()) != takes_gemv
    assert (ours is not None) == takes_gemv


def _conv_transpose_model(rng, in_ch=6, out_ch=4, hw=5, kernel=2, stride=2, pads=(0, 0, 0, 0)):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.standard_normal((in_ch, out_ch, kernel, kernel)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(out_ch).astype(np.float32), "b")
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], name="up", strides=[stride, stride],
                              pads=list(pads)),
             helper.make_node("Relu", ["t"], ["y"], name="relu")]
    out_hw = (hw - 1) * stride + kernel - pads[0] - pads[2]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_ch, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_ch, out_hw, out_hw])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("geometry", [dict(), dict(hw=8, kernel=3, stride=2, pads=(1, 1, 1, 1)), dict(out_ch=1, hw=16)])
def test_float_conv_transpose_rule_schedules_the_layer_and_matches_onnxruntime(geometry):
    """Transposed convs stay float (PP-OCR's detector head). Those whose kernel equals their stride
    are computed directly (LegalizeNonOverlappingConvTranspose, scheduled by DirectConvTranspose),
    the others by TOPI's dilate-pad-conv, scheduled by our ConvTranspose rule (dlight's generic
    rules left them serial: 58 of the detector's 64 ms); the module matches ONNX Runtime."""
    import onnxruntime as ort
    from psb_tvm.schedules.cpu import ConvTranspose, DirectConvTranspose

    tgt = host_target()
    model = _conv_transpose_model(np.random.default_rng(0), **geometry)
    mod = legalize(import_onnx(model).mod, tgt)
    (func,) = [f for gv, f in mod.functions.items() if "conv2d_transpose" in gv.name_hint]
    direct = geometry.get("kernel", 2) == geometry.get("stride", 2)
    sch = (DirectConvTranspose() if direct else ConvTranspose()).apply(func, tgt, False)
    assert sch is not None and "T.parallel(" in sch.mod["main"].script()
    assert ("conv2d_transpose_direct" in func.script()) == direct
    assert (DirectConvTranspose() if not direct else ConvTranspose()).apply(func, tgt, False) is None
    x = np.random.default_rng(1).standard_normal((1, 6 if "in_ch" not in geometry else geometry["in_ch"],
                                                  geometry.get("hw", 5), geometry.get("hw", 5))).astype(np.float32)
    module = psb_tvm.compile(model, samples=4)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(module.run(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", [dict(in_ch=24, out_ch=24, hw=10), dict(in_ch=24, out_ch=1, hw=20),
                                      dict(in_ch=5, out_ch=3, hw=7, kernel=3, stride=3)])
def test_direct_conv_transpose_equals_topi_bit_for_bit(geometry):
    """The direct transposed conv (kernel == stride: one tap per output) sums the same nonzero
    products in the same order as TOPI's dilate-pad-conv, so the compiled modules agree bit for
    bit (the detector head's 24 -> 24 and 24 -> 1 upsamplings, and a 3x3 / 3 one)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from psb_tvm import pipeline

    tgt = host_target()
    model = _conv_transpose_model(np.random.default_rng(4), **geometry)
    mod = import_onnx(model).mod
    topi = (cpu_generic.library_dispatch_passes(tgt) + cpu_generic.legalize_passes(tgt)
            + pipeline.schedule_passes(tgt) + cpu_generic.dataflow_lower_passes(tgt) + cpu_generic.finalize_passes(tgt))
    ours = pipeline.cpu_build_passes(tgt)
    x = np.random.default_rng(5).standard_normal((1, geometry["in_ch"], geometry["hw"], geometry["hw"])).astype(np.float32)
    outs = []
    for passes in (topi, ours):
        ex = tvm.compile(mod, tgt, relax_pipeline=tvm.transform.Sequential(passes))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    assert np.any(outs[0] != 0)
    np.testing.assert_array_equal(outs[1].view(np.int32), outs[0].view(np.int32))


def _pool_model(op, out_hw, channels=5, **attrs):
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x"], ["y"], name="pool", **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 17, 18])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, *out_hw])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("op,out_hw,channels,attrs", [
    ("MaxPool", (9, 9), 5, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),  # ResNet's
    ("MaxPool", (9, 9), 9, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),  # padded per plane
    ("AveragePool", (17, 18), 5, dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)),
    ("AveragePool", (17, 18), 8, dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)),
    ("AveragePool", (8, 9), 5, dict(kernel_shape=[2, 2], strides=[2, 2])),
], ids=["max_3x3_s2", "max_3x3_s2_planes", "avg_3x3_exclude_pad", "avg_3x3_planes", "avg_2x2_s2"])
def test_pool_rule_parallel_and_bit_exact(op, out_hw, channels, attrs):
    """Pool2D schedules TOPI's pooling (no other rule did: one thread, scalar): parallel and
    vectorized, the same floats as the unscheduled function (the window order is kept per lane).
    From MIN_PLANES planes on, each plane is padded inside the parallel loop, right before pooling."""
    from psb_tvm.schedules.cpu import Pool2D
    from psb_tvm.schedules.cpu.pool import MIN_PLANES

    tgt = host_target()
    mod = legalize(import_onnx(_pool_model(op, out_hw, channels, **attrs)).mod, tgt)
    (func,) = [f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "pool" in gv.name_hint]
    sch = Pool2D().apply(func, tgt, False)
    assert sch is not None and "T.parallel(" in sch.mod["main"].script() and "T.vectorized(" in sch.mod["main"].script()
    if "pads" in attrs:
        pad = sch.get_sblock("pad_temp")
        outer = sch.get(sch.get_loops(pad)[0])
        assert outer.kind == tvm.tirx.ForKind.PARALLEL
        # per plane: the pad's first loop is the pool's (batch x channels), not the pad's own rows
        assert (int(outer.extent) == channels) == (channels >= MIN_PLANES)
    x = np.random.default_rng(2).standard_normal((1, channels, 17, 18)).astype(np.float32)
    outs = []
    for f in (func, sch.mod["main"]):
        lib = tvm.compile(f.with_attr("global_symbol", "pool"), target=tgt)
        y = tvm.runtime.empty((1, channels, *out_hw), "float32", tvm.cpu())
        lib["pool"](tvm.runtime.tensor(x), y)
        outs.append(y.numpy())
    np.testing.assert_array_equal(outs[1].view(np.int32), outs[0].view(np.int32))


@pytest.fixture(scope="module")
def handoff_modules():
    model = handoff_model()
    kw = dict(samples=8, seed=3, input_shapes={"x": (1, 3, 12, 12)}, config=psb_tvm.PSBConfig.preset("int8"),
              calibration={"x": np.random.default_rng(1).normal(size=(8, 3, 12, 12)).astype(np.float32)}, cache=False)
    return psb_tvm.compile(model, **kw), psb_tvm.compile(model, frozen=True, **kw)


def test_int8_handoff_between_vnni_convs_changes_no_bit(handoff_modules):
    """HandOffInt8Activations: a vnni or depthwise conv whose output feeds one such conv and nothing
    else hands it over as the consumer's integer activations; an output read twice (conv4 -> conv5,
    conv6) or by float glue (the add, the pooling) stays float. ``main`` (hand-off), ``cached`` (the weight cache),
    ``forward`` (refinement) and the frozen module equal ``probe`` (float hand-over) bit for bit."""
    sampled, frozen = handoff_modules
    pairs = {l["name"]: l.get("int8_output_to") for l in sampled.layers if l.get("int8_output_to")}
    chain = ["conv1", "conv2", "conv3", "conv4"], ["conv7", "expand", "dw", "project"]
    assert pairs == {a: b for c in chain for a, b in zip(c, c[1:])}
    assert {l["name"]: l.get("int8_input_from") for l in sampled.layers if l.get("int8_input_from")} == {
        b: a for c in chain for a, b in zip(c, c[1:])}
    assert "int8 to conv2" in sampled.report()
    x = np.random.default_rng(5).normal(size=(1, 3, 12, 12)).astype(np.float32)
    for n in (8, 2):
        want, _ = sampled.layer_outputs(x, samples=n)
        assert np.any(want[0] != 0)
        for _ in range(2):  # the second call runs `cached` on the kept weights
            np.testing.assert_array_equal(sampled.run(x, samples=n).view(np.int32), want[0].view(np.int32))
    session = sampled.session(x, samples=4)
    session.refine()
    np.testing.assert_array_equal(session.output.view(np.int32), sampled.layer_outputs(x)[0][0].view(np.int32))
    np.testing.assert_array_equal(frozen.run(x).view(np.int32), sampled.layer_outputs(x)[0][0].view(np.int32))


def test_channels_last_float_between_packed_convs():
    """ChannelsLastFloat: a float output read only by packed convs, as input or residual operand,
    or by a global average pool, is written and read NHWC (conv4 -> conv5, conv6; conv6 -> conv5's
    residual; conv5 -> conv7; the projection -> the pool, a mean over axes 1, 2) in main, cached
    and forward; probe stays NCHW; the layer-kernel table names kernels that exist. (Bit-exactness:
    the hand-off test above compares main, cached, forward and the frozen module with probe.)"""
    mod, _, _ = compiler.lower(handoff_model(), samples=8, input_shapes={"x": (1, 3, 12, 12)},
                               config=psb_tvm.PSBConfig.preset("int8"))
    from psb_tvm.schedules.kernels import spec_of

    def specs(name):
        """layer name -> (kernel name, spec) of the layer kernels ``name`` calls (psb_<id>_<layer>...)."""
        calls = []
        relax.analysis.post_order_visit(mod[name].body, lambda e: calls.append(e.args[0]) if isinstance(e, relax.Call)
                                        and e.op == tvm.ir.Op.get("relax.call_tir") else None)
        return {g.name_hint.split("_")[2]: (g.name_hint, spec_of(mod[g])) for g in calls
                if isinstance(mod[g], tvm.tirx.PrimFunc) and spec_of(mod[g]) is not None
                and g.name_hint.split("_")[1].isdigit()}

    for name in ("main", "cached", "forward"):
        got = {layer: (s.x_nhwc, s.out_nhwc, s.res_nhwc) for layer, (_, s) in specs(name).items()}
        assert got["conv4"] == (False, True, False)
        assert got["conv6"] == (True, True, False)
        assert got["conv5"] == (True, True, True)
        assert got["conv7"] == (True, False, False) and specs(name)["conv7"][1].out_handoff is not None
        assert got["project"] == (False, True, False)  # read by the global average pool
        means = []
        relax.analysis.post_order_visit(mod[name].body, lambda e: means.append(e) if isinstance(e, relax.Call)
                                        and e.op == tvm.ir.Op.get("relax.mean") else None)
        assert [[int(a) for a in m.attrs.axis] for m in means] == [[1, 2]]  # over NHWC's rows and columns
        assert all(k.endswith(tuple(f"_c{i}" for i in range(9))) == any(v) for k, v in
                   ((kernel, got[layer]) for layer, (kernel, _) in specs(name).items()))
    assert not any(any((s.x_nhwc, s.out_nhwc, s.res_nhwc)) for _, s in specs("probe").values())
    present = {g.name_hint for g in mod.get_global_vars()}
    table = mod.attrs["psb_layer_kernels"]
    assert all(str(v) in present for kernels in table.values() for v in kernels.values())
    assert str(table["3"]["psb"]).endswith("_c0")  # conv4: main runs its channels-last kernel
    # no layer kernel is left that no function calls
    called = set()
    for f in mod.functions.values():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f.body, lambda e: called.add(e.name_hint)
                                            if isinstance(e, tvm.ir.GlobalVar) else None)
    assert all(g.name_hint in called for g, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and spec_of(f) is not None)


def test_channels_last_through_a_max_pool():
    """ResNet's stem -> max pool -> block: the stem writes NHWC, the max pool runs in NHWC layout
    (the same windows: the same maxima), the block's convs read it NHWC as input and residual,
    and main, cached, forward and the frozen module equal probe (NCHW throughout) bit for bit."""
    kw = dict(samples=8, seed=3, input_shapes={"x": (2, 3, 16, 16)}, config=psb_tvm.PSBConfig.preset("int8"),
              calibration={"x": np.random.default_rng(1).normal(size=(8, 3, 16, 16)).astype(np.float32)}, cache=False)
    mod, _, _ = compiler.lower(resnet_stem_model(batch=2), **{k: v for k, v in kw.items() if k != "cache"})
    pools = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: pools.append(e) if isinstance(e, relax.Call)
                                    and e.op == tvm.ir.Op.get("relax.nn.max_pool2d") else None)
    assert [str(p.attrs.layout) for p in pools] == ["NHWC"]
    from psb_tvm.schedules.kernels import spec_of
    kernels = {g.name_hint: spec_of(f) for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
               and spec_of(f) is not None and g.name_hint.endswith(tuple(f"_c{i}" for i in range(9)))}
    assert any("stem" in k and s.out_nhwc for k, s in kernels.items())
    assert any("conv2" in k and s.x_nhwc is False and s.res_nhwc and s.out_nhwc for k, s in kernels.items())
    x = np.random.default_rng(5).normal(size=(2, 3, 16, 16)).astype(np.float32)
    sampled = psb_tvm.compile(resnet_stem_model(batch=2), **kw)
    frozen = psb_tvm.compile(resnet_stem_model(batch=2), frozen=True, **kw)
    want, _ = sampled.layer_outputs(x)  # probe: every layer's NCHW output
    assert np.any(want[0] != 0)
    for _ in range(2):  # the second call runs `cached` on the kept weights
        np.testing.assert_array_equal(sampled.run(x).view(np.int32), want[0].view(np.int32))
    session = sampled.session(x, samples=4)
    session.refine()
    np.testing.assert_array_equal(session.output.view(np.int32), want[0].view(np.int32))
    np.testing.assert_array_equal(frozen.run(x).view(np.int32), want[0].view(np.int32))


def test_residual_add_and_relu_fused_into_the_producing_kernel():
    """FuseResidualAdd: conv5's output + conv6's, then ReLU, becomes conv5's kernel with the
    residual epilogue in main, cached and forward; probe keeps the add (its layer outputs are the
    kernels' own). The outputs stay bit-identical (test above)."""
    mod, _, _ = compiler.lower(handoff_model(), samples=8, input_shapes={"x": (1, 3, 12, 12)},
                               config=psb_tvm.PSBConfig.preset("int8"))
    add = tvm.ir.Op.get("relax.add")

    def adds(func):
        found = []
        relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.Call)
                                        and e.op == add else None)
        return len(found)

    assert [adds(mod[f]) for f in ("main", "cached", "forward", "probe")] == [0, 0, 0, 1]
    residual = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
                and "add_relu" in str((f.attrs or {}).get("psb.spec", ""))]
    assert len(residual) == 1 and "conv5" in residual[0]
