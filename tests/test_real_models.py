"""Real pretrained models from PyPI wheels (fetched into ``$PSB_TVM_CACHE`` at test time, see
``tools/zoo.py``): MTCNN PNet/RNet/ONet (facenet-pytorch), Silero VAD (silero-vad), PP-OCR
(rapidocr-onnxruntime) and ddddocr's CRNN with a bidirectional LSTM (ddddocr).

Each test skips only when the wheel cannot be downloaded (no network); the MTCNN tests also need
torch for the ONNX export (``pip install 'psb-tvm[real]'``). Thresholds are measured values with
a margin (``benchmarks/real_models.py`` prints the full tables).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo

import psb_tvm
from psb_tvm import PSBConfig
from psb_tvm.errors import UnsupportedModelError
from psb_tvm.frontend import import_onnx

pytestmark = pytest.mark.filterwarnings("ignore")

BATCH = 8
# Face decision agreement with float at n=64 (measured on these inputs: see the module docstring).
MTCNN_MIN_AGREEMENT = {"pnet": 0.95, "rnet": 0.95, "onet": 0.95}


def _fetch(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except zoo.DownloadError as err:
        pytest.skip(f"wheel not downloadable (no network?): {err}")


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------- MTCNN
@pytest.mark.parametrize("net", ["pnet", "rnet", "onet"])
def test_mtcnn_psb_agrees_with_float_and_improves_with_n(net):
    pytest.importorskip("torch", reason="exporting MTCNN to ONNX needs torch: pip install 'psb-tvm[real]'")
    shape = zoo.MTCNN_SHAPES[net]
    one = _fetch(zoo.mtcnn_onnx, net)
    batched = _fetch(zoo.mtcnn_onnx, net, (BATCH,) + shape[1:])
    x, labels = zoo.synthetic_faces(32, shape[2], seed=1)
    calib, _ = zoo.synthetic_faces(32, shape[2], seed=5)
    sess = _session(one)
    ref = zoo.run_batched(lambda b: sess.run(None, {"input": b}), x, 1)
    names = zoo.MTCNN_OUTPUTS[net]
    assert [o.name for o in sess.get_outputs()] == list(names)

    module = psb_tvm.compile(str(batched), samples=16, calibration={"input": calib})
    assert all(l["status"] == "psb" for l in module.layers), module.report()
    m = {n: zoo.mtcnn_metrics(net, ref, zoo.run_batched(lambda b: module.run(b, samples=n), x, BATCH))
         for n in (1, 8, 16, 64)}
    assert m[64]["decision_agreement"] >= MTCNN_MIN_AGREEMENT[net], m
    # the stratified sampler reaches at n=16 what the i.i.d. one needed n=64 for (measured on these
    # 32 inputs: pnet 99.8%, rnet 96.9%, onet 100%)
    assert m[16]["decision_agreement"] >= MTCNN_MIN_AGREEMENT[net], m
    assert m[64]["prob_mae"] < m[8]["prob_mae"] < m[1]["prob_mae"], m
    assert m[64]["box_mae"] < m[1]["box_mae"], m
    assert m[64]["prob_mae"] < 0.03, m


def test_mtcnn_export_matches_torch():
    torch = pytest.importorskip("torch", reason="exporting MTCNN to ONNX needs torch: pip install 'psb-tvm[real]'")
    path = _fetch(zoo.mtcnn_onnx, "rnet")
    root = zoo.extract_wheel(*zoo.FACENET)
    model = zoo._mtcnn_classes(root)["rnet"](pretrained=False)
    model.load_state_dict(torch.load(root / "facenet_pytorch" / "data" / "rnet.pt", weights_only=True))
    model.eval()
    x, _ = zoo.synthetic_faces(4, 24, seed=3)
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    sess = _session(path)
    got = zoo.run_batched(lambda b: sess.run(None, {"input": b}), x, 1)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5)
    # the float decision separates the drawn faces from the non-faces: the inputs are meaningful
    x, labels = zoo.synthetic_faces(32, 24, seed=1)
    prob = zoo.run_batched(lambda b: sess.run(None, {"input": b}), x, 1)[1][:, 1]
    assert np.mean(prob[labels == 1] > 0.5) > np.mean(prob[labels == 0] > 0.5) + 0.5


# ---------------------------------------------------------------------------- Silero VAD
def test_silero_every_variant_imports_after_rewrite():
    variants = _fetch(zoo.silero_vad_variants)
    assert "silero_vad.onnx" in variants
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (1, 576)).astype(np.float32)
    state = rng.normal(0, 0.3, (2, 1, 128)).astype(np.float32)
    feeds = {"input": x, "state": state, "sr": np.array(16000, np.int64), "h": state[:1], "c": state[1:]}
    for variant in variants:
        static = zoo.silero_vad_onnx(variant, 16000, batch_first_state=False)
        proto = onnx.load(str(static))
        assert not any(n.op_type in ("If", "LSTM") for n in proto.graph.node), variant
        shipped, fixed = _session(zoo.silero_vad_path(variant)), _session(static)
        a = shipped.run(None, {i.name: feeds[i.name] for i in shipped.get_inputs()})
        b = fixed.run(None, {i.name: feeds[i.name] for i in fixed.get_inputs()})
        for u, v in zip(a, b):
            np.testing.assert_allclose(np.asarray(v, np.float32), np.asarray(u, np.float32), atol=1e-5, err_msg=variant)
        layers = import_onnx(str(static)).layer_names
        # the STFT conv, 4 encoder convs, the decoder conv (1-D convs imported as 2-D) and the
        # LSTM's input and recurrent matmuls (unrolled)
        assert len(layers.get("conv2d", [])) == 6 and len(layers.get("dense", [])) == 2, (variant, layers)


def test_silero_as_shipped_through_the_frontend():
    raw = _fetch(zoo.silero_vad_path, "silero_vad.onnx")
    # the sample rate is a run-time input: the If on it cannot be inlined, its branches keep
    # dynamic pads that TVM's importer rejects; the error names the problem and the file
    with pytest.raises(UnsupportedModelError, match="silero_vad.onnx"):
        import_onnx(str(raw), {"input": (1, 576), "state": (2, 1, 128)})
    # the 16 kHz OpenVINO export has static shapes: the frontend inlines its Ifs, unrolls the
    # LSTM and converts the 1-D convs; float through TVM matches ONNX Runtime
    raw = zoo.silero_vad_path("silero_vad_openvino_16k.onnx")
    module = psb_tvm.compile(str(raw), config=PSBConfig(include=()))
    assert [l["op"] for l in module.layers].count("conv2d") == 6
    report = module.report()
    assert all(l["status"] == "float" and l["reason"] == "not in config.include" for l in module.layers)
    for l in module.layers:
        assert l["name"] in report
    sess = _session(raw)
    audio, _ = zoo.speech_audio(16000, seed=2, texts=zoo.SPEECH_TEXTS[:1])
    chunks = zoo.vad_chunks(audio)[:20]
    want, _ = zoo.vad_stream(lambda c, s: sess.run(None, {"input": c, "state": s}), chunks, (2, 1, 128))
    got, _ = zoo.vad_stream(lambda c, s: module.run(c, s), chunks, (2, 1, 128))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_silero_psb_speech_agreement():
    path = _fetch(zoo.silero_vad_onnx, "silero_vad.onnx", 16000)
    sess = _session(path)
    speech, _ = zoo.speech_audio(16000, seed=0, texts=zoo.SPEECH_TEXTS[:2])
    noise = zoo.noise_audio(3.0, 16000, seed=1)
    calib_audio, _ = zoo.speech_audio(16000, seed=7, texts=("A different sentence, used only to calibrate.",))
    calib_chunks = np.concatenate([zoo.vad_chunks(calib_audio), zoo.vad_chunks(zoo.noise_audio(1.0, seed=9))])
    step = lambda c, s: sess.run(None, {"input": c, "state": s})  # noqa: E731
    _, calib_states = zoo.vad_stream(step, calib_chunks)
    sets = {"speech": zoo.vad_chunks(speech), "noise": zoo.vad_chunks(noise)}
    ref = {k: zoo.vad_stream(step, v)[0] for k, v in sets.items()}
    assert np.mean(ref["speech"] > 0.5) > 0.5 and np.mean(ref["noise"] > 0.5) < 0.05  # the inputs are meaningful

    module = psb_tvm.compile(str(path), samples=16, calibration={"input": calib_chunks, "state": calib_states[:, 0]})
    report = module.report()
    assert "8 of 8 linear layers are PSB" in report
    assert "LSTM/Gemm_W" in report and "LSTM/MatMul_R_0" in report and "stft/Conv" in report
    m = {}
    for n in (1, 64):
        psb = (lambda n: lambda c, s: module.run(c, s, samples=n))(n)
        m[n] = {k: zoo.vad_metrics(ref[k], zoo.vad_stream(psb, v)[0]) for k, v in sets.items()}
    assert m[64]["speech"]["decision_agreement"] >= 0.9, m
    assert m[64]["noise"]["decision_agreement"] >= 0.95, m
    assert m[64]["speech"]["prob_mae"] < m[1]["speech"]["prob_mae"], m


# ---------------------------------------------------------------------------- PP-OCR
def test_ppocr_rendered_inputs_are_meaningful_for_the_float_models():
    """The rendered lines and pages are what the PP-OCR models expect: float recognizes the strings,
    tells upright from upside-down lines and finds the drawn lines (ONNX Runtime only)."""
    rec = _session(_fetch(zoo.ppocr_path, "rec"))
    x, texts, _ = zoo.render_text_lines(12, 320, seed=1)
    out = np.concatenate([rec.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert zoo.cer([zoo.normalize_text(t) for t in zoo.ctc_greedy_decode(out, zoo.ppocr_labels())], texts) < 0.01
    cls = _session(zoo.ppocr_path("cls"))
    x, _, flipped = zoo.render_text_lines(24, 192, seed=2, rotate_odd=True)
    assert flipped.sum() == 12
    assert np.mean(cls.run(None, {"x": x})[0].argmax(1) == flipped) >= 0.95
    det = _session(zoo.ppocr_path("det"))
    pages, boxes = zoo.text_pages(2, 320, seed=3)
    prob = det.run(None, {"x": pages})[0]
    for page, drawn in zip(prob, boxes):
        found = zoo.detection_boxes(page[0])
        # DB shrinks text regions: a found box lies inside its drawn line
        assert len(found) == len(drawn)
        assert all(any(zoo.box_iou(d, f) > 0.3 for f in found) for d in drawn)


def test_ppocr_classifier_calibration_from_onnxruntime_matches_the_float_probe():
    """PP-OCR's classifier (54 layers: HardSwish, squeeze-excite, depthwise): the layer-input
    statistics ONNX Runtime gives (0.1 s here) equal those of the float TVM probe (5 s to build)."""
    from psb_tvm.passes import find_layer_sites
    from test_calibration import compare_stats

    from psb_tvm import calibration

    path = _fetch(zoo.ppocr_path, "cls")
    calib, _, _ = zoo.render_text_lines(8, 192, seed=100, rotate_odd=True)
    imported = import_onnx(str(path), {"x": (1, 3, 48, 192)})
    sites = [s for s in find_layer_sites(imported.mod["main"]) if s.convertible]
    batches, _ = calibration.normalize_calibration({"x": calib}, imported.inputs, 8)
    assert calibration.onnx_layer_tensors(imported, sites) is not None
    probe = calibration._accumulate(calibration._tvm_runner(imported.mod, [s.index for s in sites]), len(sites),
                                    batches, imported.inputs)
    compare_stats(calibration.collect_stats(imported, sites, batches), probe, rtol=2e-5)


def test_ppocr_recognizer_compiles_with_the_default_config_and_reads_the_lines():
    """PP-OCRv4's recognizer with the default config: its BatchNorm-folded dead channels (weights
    of 1e-40) compile (encoded as zero, counted per layer) and at n=16 the lines are read. On the
    benchmark's 60 lines CER is 0.60% vs float 0.24% (issue target <= 1.0%); these 12 lines hold
    ~150 characters, one error is 0.66 points, hence the 2-point bound (the bug it guards against
    gave 80% CER)."""
    path = _fetch(zoo.ppocr_path, "rec")
    x, texts, _ = zoo.render_text_lines(12, 320, seed=1)
    calib, _, _ = zoo.render_text_lines(16, 320, seed=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = psb_tvm.compile(str(path), samples=16, input_shapes={"x": (1, 3, 48, 320)}, calibration={"x": calib})
    assert sum(l.get("negligible_channels", 0) for l in module.layers) > 0
    labels = zoo.ppocr_labels()

    def cer(out):
        return zoo.cer([zoo.normalize_text(t) for t in zoo.ctc_greedy_decode(out, labels)], texts)

    ref = _session(path)
    want = cer(np.concatenate([ref.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))]))
    got = cer(np.concatenate([module.run(x[i:i + 1], samples=16, seed=0) for i in range(len(x))]))
    assert got <= want + 0.02, (got, want)
    # layer_outputs (what the diagnosis reads) runs the network run() runs: its float glue
    # (LayerNorm, softmax, ...) fused alike (unfused, the output differed by up to 0.013)
    (probed,), _ = module.layer_outputs(x[:1], samples=16, seed=0)
    np.testing.assert_array_equal(probed.view(np.int32), module.run(x[:1], samples=16, seed=0).view(np.int32))


def test_crnn_with_a_bidirectional_lstm_reads_the_captchas():
    """ddddocr's recognizer (the issue's CRNN: 21 convs, a bidirectional LSTM of hidden size 512
    over 20 steps, a CTC head of 8210 classes) imports with its LSTM unrolled (one input projection
    per direction, one recurrent product per step) and at n=16 reads rendered captchas within the
    issue's 1 point of float CER (~120 characters here: one error is 0.8 points, hence the bound
    of 2; ``benchmarks/real_models.py`` measures 200 lines)."""
    path = _fetch(zoo.crnn_path)
    labels = zoo.crnn_labels()
    x, texts = zoo.render_captchas(24, seed=1)
    calib, _ = zoo.render_captchas(16, seed=100)
    module = psb_tvm.compile(str(path), samples=16, input_shapes={"input1": zoo.CRNN_SHAPE},
                             calibration={"input1": calib})
    names = module.psb_layers
    assert "LSTM_79/Gemm_W" in names and "LSTM_79/Gemm_W_reverse" in names
    assert sum("LSTM_79/MatMul_R_" in n for n in names) >= 2 * 19  # each direction's first step folds
    assert len(names) == len(module.layers)  # every linear layer is PSB

    def cer(outs):  # outputs [T, 1, classes] per image
        return zoo.cer(zoo.ctc_greedy_decode(np.concatenate([o.transpose(1, 0, 2) for o in outs]), labels), texts)

    ref = _session(path)
    want = cer([ref.run(None, {"input1": x[i:i + 1]})[0] for i in range(len(x))])
    got = cer([module.run(x[i:i + 1], samples=16, seed=0) for i in range(len(x))])
    assert want < 0.05, want  # the rendered captchas are readable
    assert got <= want + 0.02, (got, want)


@pytest.mark.slow
def test_ppocr_classifier_compiled_error_is_the_schemes():
    """PP-OCR's direction classifier (MobileNetV3: HardSwish, squeeze-excite, depthwise): every
    PSB layer's compiled error is what sampling and activation rounding explain, the kernels match
    their float emulation, and n=64 keeps the decisions."""
    path = _fetch(zoo.ppocr_path, "cls")
    x, _, flipped = zoo.render_text_lines(16, 192, seed=2, rotate_odd=True)
    calib, _, _ = zoo.render_text_lines(16, 192, seed=100, rotate_odd=True)
    d16, d64 = psb_tvm.diagnose(str(path), {"x": x}, samples=[16, 64], input_shapes={"x": (1, 3, 48, 192)},
                                calibration={"x": calib}, progress=False)
    for d in (d16, d64):
        assert not any(l.excess for l in d.layers), d.markdown()
        assert max(l.kernel for l in d.layers) < 1e-5
    assert d64.output["scheme"] < d16.output["scheme"]
