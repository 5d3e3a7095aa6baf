"""Real pretrained models from PyPI wheels, fetched and cached at use time (never committed): the
real-model tests and benchmarks import it (``import zoo`` with tools/ on the path); it is not part of
the installed package.

* MTCNN (PNet, RNet, ONet) from the ``facenet-pytorch`` wheel: the weights (``data/*.pt``) and
  the class definitions of ``models/mtcnn.py`` (only the three ``nn.Module`` classes are executed,
  not the module, so torchvision is not needed), exported to ONNX with ``torch.onnx.export`` at
  fixed shapes. Needs torch (``pip install 'psb-tvm[real]'``).
* PP-OCR (text detector, recognizer, direction classifier) from the ``rapidocr-onnxruntime`` wheel,
  with rendered text lines and pages as inputs (:func:`render_text_lines`, :func:`text_pages`).
* Silero VAD from the ``silero-vad`` wheel (``silero_vad/data/*.onnx``), as shipped
  (:func:`silero_vad_path`) or made importable (:func:`silero_vad_onnx`): the sample rate bound to
  a constant, shapes fixed, constant ``If`` branches inlined and ``LSTM`` unrolled
  (:mod:`psb_tvm.onnx_rewrite`).
* ddddocr's CRNN text recognizer (CNN + bidirectional LSTM + CTC over 8210 classes) from the
  ``ddddocr`` wheel, as shipped (:func:`crnn_path`, :func:`crnn_labels`), with rendered captcha
  strings as inputs (:func:`render_captchas`).

Wheels are downloaded with ``pip download --no-deps`` into ``$PSB_TVM_CACHE/wheels`` (default
``~/.cache/psb_tvm``); extracted files and exported models live beside them. Without network or
pip, :class:`FetchError` says so. Every wheel is checked against its SHA-256 in
:data:`WHEEL_SHA256` before anything is extracted or run from it: a mismatch raises
:class:`WheelHashError` and deletes the file; a wheel whose file name has no pinned hash (pip chose
another build) is refused unless ``PSB_TVM_ZOO_TRUST_UNPINNED=1`` is set (then it is used unchecked,
with a warning).

Input generators: :func:`synthetic_faces` (numpy-drawn faces and non-face crops) and
:func:`speech_audio` (espeak-ng when installed, else formant-synthesised vowels) / :func:`noise_audio`,
cut into VAD chunks by :func:`vad_chunks`.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from psb_tvm.errors import DownloadError, FetchError, WheelHashError
from psb_tvm.files import cache_root, file_sha256
from psb_tvm.onnx_rewrite import bind_inputs, make_static, set_input_shapes

FACENET = ("facenet-pytorch", "2.6.0")
SILERO = ("silero-vad", "6.2.3")
RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
DDDDOCR = ("ddddocr", "1.6.1")
#: SHA-256 of each wheel file the zoo uses, by file name (computed from the PyPI files of the pinned
#: versions above). A file pip downloads is used only if its name is listed and its hash matches.
WHEEL_SHA256 = {
    "facenet_pytorch-2.6.0-py3-none-any.whl": "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
    "silero_vad-6.2.3-py3-none-any.whl": "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl": "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    "ddddocr-1.6.1-py3-none-any.whl": "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
}
#: ddddocr's recognizer (a CRNN: 21 convs, a bidirectional LSTM of hidden size 512, a linear CTC head
#: over 8210 classes) takes grey [1, 1, 64, width] in [0, 1]; width 160 gives 20 time steps.
CRNN_SHAPE = (1, 1, 64, 160)
CAPTCHA_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
#: Set to 1 to use a wheel whose file name has no pinned hash (unchecked).
TRUST_UNPINNED_ENV = "PSB_TVM_ZOO_TRUST_UNPINNED"
#: PP-OCR models of the rapidocr wheel and their input shapes (NCHW).
PPOCR_FILES = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
               "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
PPOCR_SHAPES = {"det": (1, 3, 320, 320), "rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192)}
#: Words the rendered OCR lines are made of (English, so the recognizer's dictionary covers them).
OCR_WORDS = ("invoice", "total", "amount", "order", "date", "number", "street", "city", "phone", "email",
             "price", "quantity", "item", "paid", "balance", "account", "customer", "product", "tax", "due",
             "Model", "Compiler", "Sample", "Kernel", "Tensor", "Layer", "Vector", "Binary", "Shift", "Scale")

#: MTCNN input shapes used by default (NCHW; PNet is fully convolutional, any size >= 12 works).
MTCNN_SHAPES = {"pnet": (1, 3, 48, 48), "rnet": (1, 3, 24, 24), "onet": (1, 3, 48, 48)}
#: Output names of the exported MTCNN nets, in order (``prob``: softmax over non-face / face).
MTCNN_OUTPUTS = {"pnet": ("boxes", "prob"), "rnet": ("boxes", "prob"), "onet": ("boxes", "landmarks", "prob")}
#: Samples per VAD chunk and the context the silero wrapper prepends to each chunk.
VAD_CHUNK = {16000: 512, 8000: 256}
VAD_CONTEXT = {16000: 64, 8000: 32}




# ---------------------------------------------------------------------------- cache and wheels
def cache_dir() -> pathlib.Path:
    """``$PSB_TVM_CACHE`` or ``~/.cache/psb_tvm`` (``psb_tvm.files.cache_root``)."""
    return cache_root()


def _wheel_glob(package: str, version: str) -> str:
    return f"{package.replace('-', '_')}-{version}-*.whl"


def verify_wheel(path: pathlib.Path) -> str:
    """Check ``path`` against :data:`WHEEL_SHA256` and return its SHA-256. A mismatch deletes the
    file and raises :class:`WheelHashError`; so does an unlisted file name (without deleting it)
    unless ``PSB_TVM_ZOO_TRUST_UNPINNED=1``."""
    path = pathlib.Path(path)
    got = file_sha256(path)
    expected = WHEEL_SHA256.get(path.name)
    if expected is None:
        if os.environ.get(TRUST_UNPINNED_ENV) == "1":
            import warnings

            warnings.warn(f"{path}: no pinned SHA-256 for {path.name}; used unchecked ({TRUST_UNPINNED_ENV}=1), "
                          f"sha256 {got}", stacklevel=3)
            return got
        raise WheelHashError(f"{path}: no pinned SHA-256 for the wheel file {path.name} (pinned: {sorted(WHEEL_SHA256)}); "
                             f"pip picked another build. Add its hash to WHEEL_SHA256 in tools/zoo.py, or set "
                             f"{TRUST_UNPINNED_ENV}=1 to use it unchecked (sha256 {got})")
    if got != expected:
        path.unlink(missing_ok=True)
        raise WheelHashError(f"{path}: SHA-256 {got} does not match the pinned {expected} for {path.name}; "
                             "the file was deleted (a damaged download or a changed package: it will be downloaded again)")
    return got


def fetch_wheel(package: str, version: str, timeout: float = 300) -> pathlib.Path:
    """The cached wheel of ``package==version``, downloaded with ``pip download --no-deps`` if absent,
    checked against its pinned SHA-256 (:func:`verify_wheel`) before it is returned."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(_wheel_glob(package, version)), key=lambda p: (p.name not in WHEEL_SHA256, p.name))
    if found:
        verify_wheel(found[0])
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "--no-input", "-q", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DownloadError(f"cannot download {package}=={version} with pip ({type(err).__name__}: {err})") from err
        got = sorted(pathlib.Path(tmp).glob(_wheel_glob(package, version)))
        if proc.returncode != 0 or not got:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise DownloadError(f"cannot download {package}=={version} with `pip download` (no network or no index?): "
                             f"exit {proc.returncode}: {tail}")
        verify_wheel(got[0])  # in the temporary folder: a bad file never enters the cache
        dst = wheels / got[0].name
        os.replace(got[0], dst)
    return dst


def extract_wheel(package: str, version: str) -> pathlib.Path:
    """The wheel's files, extracted once under ``<cache>/extracted/<wheel name>``."""
    wheel = fetch_wheel(package, version)
    digest = file_sha256(wheel)
    dst = cache_dir() / "extracted" / wheel.stem
    marker = dst / ".complete"  # holds the SHA-256 of the wheel it was extracted from
    if marker.exists() and marker.read_text().strip() == digest:
        return dst
    tmp = pathlib.Path(tempfile.mkdtemp(dir=dst.parent if dst.parent.exists() else _mkdir(dst.parent)))
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        (tmp / ".complete").write_text(digest + "\n")
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    except zipfile.BadZipFile as err:
        wheel.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: corrupt wheel (deleted; it will be downloaded again): {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _mkdir(p: pathlib.Path) -> pathlib.Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _atomic_save(proto, path: pathlib.Path) -> pathlib.Path:
    import onnx

    _mkdir(path.parent)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- MTCNN
def _mtcnn_classes(root: pathlib.Path) -> dict:
    """PNet, RNet and ONet from ``models/mtcnn.py``: only the three class definitions are executed."""
    import torch
    from torch import nn

    src = root / "facenet_pytorch" / "models" / "mtcnn.py"
    tree = ast.parse(src.read_text(), str(src))
    keep = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("PNet", "RNet", "ONet")]
    if len(keep) != 3:
        raise FetchError(f"{src}: expected classes PNet, RNet, ONet, found {[n.name for n in keep]}")
    namespace = {"torch": torch, "nn": nn, "np": np, "os": os, "__name__": "facenet_pytorch_mtcnn"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(src), "exec"), namespace)  # noqa: S102
    return {name.lower(): namespace[name] for name in ("PNet", "RNet", "ONet")}


def mtcnn_onnx(net: str, shape: tuple | None = None) -> pathlib.Path:
    """ONNX file of the pretrained MTCNN ``net`` ("pnet", "rnet" or "onet") at a fixed input shape.

    Input ``input`` is NCHW RGB normalised as MTCNN does: ``(pixel - 127.5) / 128``. Outputs
    (:data:`MTCNN_OUTPUTS`): ``boxes`` (box regression: 4 channels), for ONet ``landmarks`` (10),
    and ``prob`` (softmax over non-face / face; PNet's outputs are maps over 12x12 windows).
    """
    net = net.lower()
    if net not in MTCNN_SHAPES:
        raise ValueError(f"net must be one of {sorted(MTCNN_SHAPES)}, got {net!r}")
    shape = tuple(int(d) for d in (shape or MTCNN_SHAPES[net]))
    dst = cache_dir() / "models" / f"mtcnn_{net}_{'x'.join(map(str, shape))}.onnx"
    if dst.exists():
        return dst
    try:
        import torch
    except ImportError as err:
        raise FetchError("exporting MTCNN needs torch: pip install 'psb-tvm[real]' (torch==2.13.0)") from err
    root = extract_wheel(*FACENET)
    model = _mtcnn_classes(root)[net](pretrained=False)
    state = torch.load(root / "facenet_pytorch" / "data" / f"{net}.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    outputs = list(MTCNN_OUTPUTS[net])
    _mkdir(dst.parent)
    tmp = dst.with_suffix(f".tmp{os.getpid()}.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(shape),), str(tmp), input_names=["input"], output_names=outputs,
                          opset_version=13, dynamo=False)
    os.replace(tmp, dst)
    return dst


def _disk(mask_shape, cy, cx, ry, rx):
    h, w = mask_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def _draw_face(rng, size: int) -> np.ndarray:
    """An HWC uint8-range float image of a simple face: skin-tone head, eyes, brows, nose, mouth."""
    img = _background(rng, size)
    s = size
    cy, cx = s * rng.uniform(0.47, 0.53), s * rng.uniform(0.46, 0.54)
    ry, rx = s * rng.uniform(0.40, 0.47), s * rng.uniform(0.31, 0.38)
    skin = np.array([rng.uniform(150, 235), rng.uniform(105, 180), rng.uniform(80, 150)], np.float32)
    hair = np.array(rng.uniform(10, 90, 3), np.float32)
    head = _disk((s, s), cy, cx, ry, rx)
    top = _disk((s, s), cy - ry * 0.25, cx, ry * 0.85, rx * 1.08) & ~_disk((s, s), cy + ry * 0.05, cx, ry * 0.85, rx * 0.95)
    img[top] = hair
    img[head] = skin
    # shading: darker towards the head's edge
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    rr = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    img[head] *= (1.0 - 0.25 * np.clip(rr[head], 0, 1) ** 2)[:, None]
    ey, dx = cy - ry * rng.uniform(0.12, 0.22), rx * rng.uniform(0.36, 0.46)
    for side in (-1, 1):
        ex = cx + side * dx
        img[_disk((s, s), ey, ex, ry * 0.09, rx * 0.2)] = (235, 235, 235)
        img[_disk((s, s), ey, ex + rng.uniform(-0.05, 0.05) * rx, ry * 0.07, rx * 0.09)] = (30, 25, 20)
        brow = _disk((s, s), ey - ry * 0.17, ex, ry * 0.035, rx * 0.24)
        img[brow] = hair
    nose = _disk((s, s), cy + ry * 0.12, cx, ry * 0.16, rx * 0.08)
    img[nose] = skin * 0.8
    my = cy + ry * rng.uniform(0.42, 0.52)
    mouth = _disk((s, s), my, cx, ry * rng.uniform(0.05, 0.1), rx * rng.uniform(0.3, 0.45))
    img[mouth] = (rng.uniform(120, 190), 40, 50)
    return img


def _background(rng, size: int) -> np.ndarray:
    """A smooth random colour field plus noise, HWC in [0, 255]."""
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    idx = np.linspace(0, 3, size)
    i0 = np.floor(idx).astype(int).clip(0, 2)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t)[:, :, None] + coarse[i0 + 1] * t[:, :, None]          # [size, 4, 3]
    img = rows[:, i0] * (1 - t.T)[:, :, None] + rows[:, i0 + 1] * t.T[:, :, None]     # [size, size, 3]
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.float32)


def _nonface(rng, size: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # pure noise
        return rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    img = _background(rng, size)
    if kind == 2:  # random ellipses and bars (objects, not faces)
        for _ in range(rng.integers(1, 5)):
            m = _disk((size, size), *rng.uniform(0, size, 2), *rng.uniform(size * 0.05, size * 0.4, 2))
            img[m] = rng.uniform(0, 255, 3)
    elif kind == 3:  # stripes / texture
        yy, xx = np.mgrid[0:size, 0:size]
        f, a = rng.uniform(0.1, 0.8), rng.uniform(0, np.pi)
        img += 60 * np.sin(f * (np.cos(a) * xx + np.sin(a) * yy))[:, :, None]
    return np.clip(img, 0, 255).astype(np.float32)


def synthetic_faces(count: int, size: int, seed: int = 0, face_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(images [count, 3, size, size] float32 normalised for MTCNN, labels [count] 1=face 0=non-face)``.

    Faces are drawn with numpy (head ellipse in a random skin tone, hair, eyes, brows, nose and
    mouth on a random smooth background, jittered); non-faces are noise, smooth colour fields,
    random ellipses and stripe textures. The first ``round(count * face_fraction)`` are faces.
    """
    rng = np.random.default_rng(seed)
    faces = int(round(count * face_fraction))
    imgs = [(_draw_face(rng, size) if i < faces else _nonface(rng, size)) for i in range(count)]
    x = np.stack(imgs).transpose(0, 3, 1, 2)
    labels = (np.arange(count) < faces).astype(np.int64)
    return ((x - 127.5) * 0.0078125).astype(np.float32), labels


# ---------------------------------------------------------------------------- Silero VAD
def silero_vad_path(variant: str = "silero_vad.onnx") -> pathlib.Path:
    """One ONNX file of the silero-vad wheel, as shipped (see :func:`silero_vad_variants`)."""
    data = extract_wheel(*SILERO) / "silero_vad" / "data"
    path = data / variant
    if not path.exists():
        raise FetchError(f"silero-vad {SILERO[1]} has no {variant}; it has {sorted(p.name for p in data.glob('*.onnx'))}")
    return path


def silero_vad_variants() -> list[str]:
    """The ONNX files of the silero-vad wheel."""
    return sorted(p.name for p in (extract_wheel(*SILERO) / "silero_vad" / "data").glob("*.onnx"))


def _state_batch_first(proto, batch: int):
    """Let the model take and return ``state`` as [batch, 2, 128] (Transpose nodes around the original)."""
    from onnx import helper

    def rename(graph):  # subgraphs (nested If branches) read the outer state by name
        for n in graph.node:
            n.input[:] = ["state_2bh" if i == "state" else i for i in n.input]
            n.output[:] = ["stateN_2bh" if o == "stateN" else o for o in n.output]
            for a in n.attribute:
                for g in ([a.g] if a.type == a.GRAPH else []) + list(a.graphs):
                    rename(g)

    rename(proto.graph)
    proto.graph.node.insert(0, helper.make_node("Transpose", ["state"], ["state_2bh"], name="state_batch_first", perm=[1, 0, 2]))
    proto.graph.node.append(helper.make_node("Transpose", ["stateN_2bh"], ["stateN"], name="stateN_batch_first", perm=[1, 0, 2]))
    for vi in proto.graph.output:
        if vi.name == "stateN":
            del vi.type.tensor_type.shape.dim[:]
            for d in (batch, 2, 128):
                vi.type.tensor_type.shape.dim.add().dim_value = d
    return proto


def silero_vad_onnx(variant: str = "silero_vad.onnx", sample_rate: int = 16000, batch: int = 1,
                    batch_first_state: bool = True) -> pathlib.Path:
    """A silero VAD model made importable: ``sr`` bound to ``sample_rate``, every input shape fixed
    (``input`` [batch, chunk + context], ``state`` [batch, 2, 128] with ``batch_first_state`` (psb_tvm's
    calibration stacks samples on the first axis of every input), else as shipped [2, batch, 128];
    ``stateN`` likewise), then (see
    :func:`psb_tvm.onnx_rewrite.make_static`) shape subgraphs folded, ``If`` nodes with constant
    conditions inlined and ``LSTM`` nodes unrolled into MatMul/Sigmoid/Tanh.

    Variants without an ``sr`` input are 16 kHz models; ``silero_vad_16k_sequence.onnx`` takes
    ``input`` [batch, 576] (each row one chunk) and ``h``/``c`` [1, 1, 128].
    """
    import onnx


    if sample_rate not in VAD_CHUNK:
        raise ValueError(f"sample_rate must be 8000 or 16000, got {sample_rate}")
    src = silero_vad_path(variant)
    tag = hashlib.sha1(src.read_bytes()).hexdigest()[:8]
    layout = "bf" if batch_first_state else "sb"
    dst = cache_dir() / "models" / f"{src.stem}_{sample_rate}_b{batch}_{layout}_{tag}_static.onnx"
    if dst.exists():
        return dst
    proto = onnx.load(str(src))
    names = {i.name for i in proto.graph.input}
    if "sr" in names:
        proto = bind_inputs(proto, {"sr": np.array(sample_rate, np.int64)})
    elif sample_rate != 16000:
        raise ValueError(f"{variant} is a 16 kHz model (no sr input)")
    width = VAD_CHUNK[sample_rate] + VAD_CONTEXT[sample_rate]
    shapes = {"input": (batch, width)}
    if "state" in names:
        shapes["state"] = (2, batch, 128)
        if batch_first_state:
            proto = _state_batch_first(proto, batch)
            shapes["state"] = (batch, 2, 128)
    if "h" in names:
        shapes.update(h=(1, 1, 128), c=(1, 1, 128))
    proto = set_input_shapes(proto, shapes)
    proto = make_static(proto)
    return _atomic_save(proto, dst)


def vad_chunks(audio: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """``[chunks, context + chunk]`` float32 rows as the silero wrapper feeds them: each chunk of
    512 (16 kHz) / 256 (8 kHz) samples with the previous 64 / 32 samples (zeros first) in front."""
    chunk, ctx = VAD_CHUNK[sample_rate], VAD_CONTEXT[sample_rate]
    audio = np.asarray(audio, np.float32)
    count = len(audio) // chunk
    padded = np.concatenate([np.zeros(ctx, np.float32), audio[:count * chunk]])
    return np.stack([padded[i * chunk:i * chunk + ctx + chunk] for i in range(count)])


def _resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(src, dst)
    return resample_poly(x, dst // g, src // g).astype(np.float32)


SPEECH_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Voice activity detection decides which parts of a recording contain speech.",
    "Progressive stochastic binarization trades samples for accuracy at run time.",
    "Please call Stella and ask her to bring these things with her from the store.",
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speech_audio(sample_rate: int = 16000, seed: int = 0, texts=SPEECH_TEXTS) -> tuple[np.ndarray, str]:
    """``(audio float32 in [-1, 1], source)``: ``texts`` spoken by espeak-ng (voice, speed and pitch
    varied by ``seed``) with short pauses, or, without espeak-ng, formant-synthesised vowel-like
    signals (harmonics of a jittered pitch shaped by vowel formants, syllable-rate amplitude
    modulation). ``source`` says which ("espeak-ng" or "formant-synthesis")."""
    import io
    import wave

    rng = np.random.default_rng(seed)
    if espeak_available():
        parts = []
        for i, text in enumerate(texts):
            voice = ("en", "en-us", "en+f3", "en+m3")[(seed + i) % 4]
            cmd = ["espeak-ng", "--stdout", "-v", voice, "-s", str(int(rng.integers(140, 190))),
                   "-p", str(int(rng.integers(30, 70))), text]
            try:
                wav = subprocess.run(cmd, capture_output=True, timeout=60, check=True).stdout
                with wave.open(io.BytesIO(wav)) as w:
                    rate, raw = w.getframerate(), w.readframes(w.getnframes())
            except (OSError, subprocess.SubprocessError, wave.Error, EOFError):
                parts = []
                break
            x = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
            parts += [_resample(x, rate, sample_rate), np.zeros(int(0.3 * sample_rate), np.float32)]
        if parts:
            return np.concatenate(parts).astype(np.float32), "espeak-ng"
    return _formant_speech(rng, sample_rate, seconds=2.5 * len(texts)), "formant-synthesis"


def _formant_speech(rng, sample_rate: int, seconds: float) -> np.ndarray:
    from scipy.signal import lfilter

    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]
    out, t0 = [], 0.0
    while t0 < seconds:
        dur = rng.uniform(0.15, 0.35)
        n = int(dur * sample_rate)
        f0 = rng.uniform(90, 220) * (1 + 0.05 * np.sin(np.linspace(0, rng.uniform(2, 6), n)))
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        src = sum(np.sin(k * phase) / k for k in range(1, 30))
        y = np.zeros(n)
        for f, bw in zip(vowels[rng.integers(len(vowels))], (80, 100, 120)):
            r = np.exp(-np.pi * bw / sample_rate)
            y += lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / sample_rate), r * r], src)
        y *= np.hanning(n) * (0.5 + 0.5 * np.sin(np.linspace(0, np.pi * rng.uniform(1, 3), n)) ** 2)
        out.append(y)
        if rng.uniform() < 0.3:
            out.append(np.zeros(int(rng.uniform(0.1, 0.4) * sample_rate)))
        t0 += dur
    x = np.concatenate(out)
    return (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def noise_audio(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Non-speech: white, pink-ish and hum segments plus silence, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    quarter = n // 4
    white = rng.normal(0, 0.1, quarter)
    pink = np.cumsum(rng.normal(0, 0.02, quarter))
    pink = 0.2 * (pink - pink.mean()) / (np.abs(pink).max() + 1e-9)
    t = np.arange(quarter) / sample_rate
    hum = 0.1 * np.sin(2 * np.pi * 50 * t) + 0.05 * np.sin(2 * np.pi * 150 * t) + rng.normal(0, 0.01, quarter)
    silence = rng.normal(0, 1e-3, n - 3 * quarter)
    return np.concatenate([white, pink, hum, silence]).astype(np.float32)


# ---------------------------------------------------------------------------- ddddocr (CRNN)
def crnn_path() -> pathlib.Path:
    """ddddocr's recognizer ``common.onnx`` (CNN + bidirectional LSTM + CTC) from the ``ddddocr`` wheel."""
    path = extract_wheel(*DDDDOCR) / "ddddocr" / "common.onnx"
    if not path.exists():
        raise FetchError(f"{DDDDOCR[0]} {DDDDOCR[1]} has no ddddocr/common.onnx")
    return path


def crnn_labels() -> list[str]:
    """The recognizer's CTC labels (``CHARSET_BETA`` of the wheel's ``charsets.py``; 0 is the blank),
    read as a literal: none of the package's code runs."""
    import ast

    path = extract_wheel(*DDDDOCR) / "ddddocr" / "charsets.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CHARSET_BETA" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise FetchError(f"{path} has no CHARSET_BETA")


def render_captchas(count: int, width: int = CRNN_SHAPE[3], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``(images [count, 1, 64, width] float32 in [0, 1], texts)``: 4-6 random characters of
    :data:`CAPTCHA_ALPHABET` drawn dark on a light background with Pillow's default font (random
    size, shade, margins), resized to height 64 keeping the aspect ratio and padded on the right
    with the background, as ddddocr prepares its input."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    letters = list(CAPTCHA_ALPHABET)
    images = np.zeros((count, 1, 64, width), np.float32)
    texts = []
    for i in range(count):
        text = "".join(rng.choice(letters, int(rng.integers(4, 7))))
        font = ImageFont.load_default(size=int(rng.integers(26, 36)))
        x0, y0, x1, y1 = font.getbbox(text)
        pad, bg = int(rng.integers(4, 10)), int(rng.integers(200, 256))
        img = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), bg)
        ImageDraw.Draw(img).text((pad - x0, pad - y0), text, fill=int(rng.integers(0, 60)), font=font)
        w = min(width, max(1, int(round(img.width * 64 / img.height))))
        arr = np.full((64, width), bg, np.float32)
        arr[:, :w] = np.asarray(img.resize((w, 64), Image.BILINEAR), np.float32)
        images[i, 0] = arr / 255.0
        texts.append(text)
    return images, texts


# ---------------------------------------------------------------------------- PP-OCR
def ppocr_path(model: str) -> pathlib.Path:
    """One PP-OCR ONNX file of the ``rapidocr-onnxruntime`` wheel: ``"det"``, ``"rec"`` or ``"cls"``."""
    if model not in PPOCR_FILES:
        raise ValueError(f"model must be one of {sorted(PPOCR_FILES)}, got {model!r}")
    path = extract_wheel(*RAPIDOCR) / "rapidocr_onnxruntime" / "models" / PPOCR_FILES[model]
    if not path.exists():
        raise FetchError(f"{RAPIDOCR[0]} {RAPIDOCR[1]} has no {PPOCR_FILES[model]}")
    return path


def ppocr_labels() -> list[str]:
    """The recognizer's CTC labels: blank, the dictionary in the model's ``character`` metadata, space."""
    import onnx

    proto = onnx.load(str(ppocr_path("rec")), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        raise FetchError(f"{ppocr_path('rec')} has no 'character' metadata (the recognizer's dictionary)")
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def ctc_greedy_decode(logits: np.ndarray, labels: list[str]) -> list[str]:
    """Best-path CTC decoding of ``[batch, T, classes]`` (time-major ``[T, batch, classes]``
    outputs: transpose first): argmax, merge repeats, drop blanks (0)."""
    best = np.asarray(logits).argmax(axis=-1)
    out = []
    for row in best:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
        out.append("".join(labels[i] for i in row[keep]))
    return out


def normalize_text(text: str) -> str:
    """A recognised line as OCR evaluation compares it: leading and trailing spaces dropped, runs
    of spaces collapsed. The PP-OCR recognizer emits a space at the edge of the zero padding on
    most of our rendered lines (float: 2.4% CER raw, 0.24% normalised); PaddleOCR's own metric
    goes further and ignores every space."""
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(predictions: list[str], truths: list[str]) -> float:
    """Character error rate: total edit distance over total reference length."""
    errors = sum(edit_distance(p, t) for p, t in zip(predictions, truths, strict=True))
    return errors / max(1, sum(len(t) for t in truths))


def _text_strings(count: int, rng) -> list[str]:
    words = OCR_WORDS
    out = []
    for _ in range(count):
        k = int(rng.integers(1, 4))
        parts = [words[i] for i in rng.integers(0, len(words), k)]
        if rng.random() < 0.5:
            parts.insert(int(rng.integers(0, k + 1)), str(int(rng.integers(0, 10000))))
        out.append(" ".join(parts))
    return out


def render_text_lines(count: int, width: int = 320, height: int = 48, seed: int = 0,
                      texts: list[str] | None = None, rotate_odd: bool = False) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(images [count, 3, height, width] float32, texts, flipped [count] bool)``: known strings
    drawn in black on a light background with Pillow's scalable default font (random size, shade,
    margins), resized to ``height`` keeping the aspect ratio, scaled ``(x/255 - 0.5)/0.5`` and padded
    on the right with zeros to ``width``, as PP-OCR's recognizer and classifier expect. With
    ``rotate_odd`` every odd line is rotated by 180 degrees and marked in ``flipped`` (the
    classifier's label)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    texts = list(texts) if texts is not None else _text_strings(count, rng)
    images = np.zeros((len(texts), 3, height, width), np.float32)
    flipped = (np.arange(len(texts)) % 2 == 1) & rotate_odd
    for i, text in enumerate(texts):
        font = ImageFont.load_default(size=int(rng.integers(22, 34)))
        x0, y0, x1, y1 = font.getbbox(text)
        pad = int(rng.integers(3, 9))
        bg = int(rng.integers(200, 256))
        img = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), bg)
        ImageDraw.Draw(img).text((pad - x0, pad - y0), text, fill=int(rng.integers(0, 60)), font=font)
        if flipped[i]:
            img = img.rotate(180)
        w = min(width, max(1, int(round(img.width * height / img.height))))
        arr = np.asarray(img.resize((w, height), Image.BILINEAR), np.float32)
        images[i, :, :, :w] = ((arr / 255.0 - 0.5) / 0.5)[None]
    return images, texts, flipped


def text_pages(count: int, size: int = 320, seed: int = 0) -> tuple[np.ndarray, list]:
    """``(images [count, 3, size, size] float32, boxes)``: a few text lines per light page, in the
    detector's normalisation (ImageNet mean/std on RGB in [0, 1]); ``boxes`` per page lists
    ``(x0, y0, x1, y1)`` of each drawn line."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    images, boxes = np.zeros((count, 3, size, size), np.float32), []
    for i in range(count):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw, page, y = ImageDraw.Draw(img), [], int(rng.integers(8, 30))
        for text in _text_strings(int(rng.integers(2, 6)), rng):
            font = ImageFont.load_default(size=int(rng.integers(16, 30)))
            x = int(rng.integers(5, 40))
            x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
            if y1 > size - 5:
                break
            draw.text((x, y), text, fill=tuple(int(v) for v in rng.integers(0, 70, 3)), font=font)
            page.append((x0, y0, min(x1, size - 1), y1))
            y = y1 + int(rng.integers(10, 30))
        arr = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        images[i] = (arr - mean) / std
        boxes.append(page)
    return images, boxes


def detection_boxes(prob_map: np.ndarray, threshold: float = 0.3, min_area: int = 16) -> list:
    """Axis-aligned boxes ``(x0, y0, x1, y1)`` of the connected regions of ``prob_map > threshold``
    ([H, W], 4-connectivity) with at least ``min_area`` pixels: a simple stand-in for DB post-processing."""
    mask = np.asarray(prob_map) > threshold
    label = np.zeros(mask.shape, np.int32)
    boxes, current = [], 0
    for sy, sx in zip(*np.nonzero(mask)):
        if label[sy, sx]:
            continue
        current += 1
        stack, ys, xs = [(sy, sx)], [], []
        label[sy, sx] = current
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    stack.append((ny, nx))
        if len(ys) >= min_area:
            boxes.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    return boxes


def box_iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_agreement(reference: list, boxes: list, iou: float = 0.5) -> float:
    """F1 of ``boxes`` against ``reference`` (greedy one-to-one matching at ``iou``); 1.0 when both are empty."""
    if not reference and not boxes:
        return 1.0
    used, matched = set(), 0
    for r in reference:
        best, arg = iou, None
        for j, b in enumerate(boxes):
            if j not in used and box_iou(r, b) >= best:
                best, arg = box_iou(r, b), j
        if arg is not None:
            used.add(arg)
            matched += 1
    return 2 * matched / (len(reference) + len(boxes))


# ---------------------------------------------------------------------------- evaluation helpers
def run_batched(fn, x: np.ndarray, batch: int) -> tuple:
    """Run ``fn`` (numpy [batch, ...] -> array or tuple of arrays) over ``x`` in chunks of
    ``batch`` (the last chunk padded by repetition) and concatenate the outputs."""
    outs = []
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        real = len(part)
        if real < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - real, axis=0)])
        y = fn(part)
        outs.append(tuple(np.asarray(a)[:real] for a in (y if isinstance(y, (tuple, list)) else (y,))))
    return tuple(np.concatenate(parts) for parts in zip(*outs))


def mtcnn_metrics(net: str, ref: tuple, got: tuple, threshold: float = 0.5) -> dict:
    """Agreement of ``got`` with the float outputs ``ref`` (both in :data:`MTCNN_OUTPUTS` order):
    face decision (``prob[:, 1] > threshold``, per image, per window for PNet), mean absolute
    error of the face probability, of the box regression and (ONet) of the landmarks."""
    names = MTCNN_OUTPUTS[net]
    pr = np.asarray(ref[names.index("prob")])[:, 1]
    pg = np.asarray(got[names.index("prob")])[:, 1]
    out = {"decision_agreement": float(np.mean((pr > threshold) == (pg > threshold))),
           "prob_mae": float(np.mean(np.abs(pr - pg))),
           "box_mae": float(np.mean(np.abs(ref[names.index("boxes")] - got[names.index("boxes")]))),
           "face_fraction_float": float(np.mean(pr > threshold))}
    if "landmarks" in names:
        i = names.index("landmarks")
        out["landmark_mae"] = float(np.mean(np.abs(ref[i] - got[i])))
    return out


def vad_stream(step, chunks: np.ndarray, state_shape=(1, 2, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Run a silero model over ``chunks`` [T, width] in order, carrying the LSTM state.

    ``step(input [1, width], state) -> (prob [1, 1], new state)`` with state of ``state_shape``
    ([1, 2, 128] for :func:`silero_vad_onnx`'s default, (2, 1, 128) as shipped). Returns
    ``(speech probabilities [T], the states fed at each step [T, *state_shape])``: the states are
    what calibration needs for the ``state`` input."""
    batch = 1
    state = np.zeros(state_shape, np.float32)
    probs, states = [], []
    for row in chunks:
        states.append(state)
        prob, state = step(np.repeat(row[None, :], batch, axis=0).astype(np.float32), state)
        state = np.asarray(state, np.float32)
        probs.append(float(np.asarray(prob).reshape(-1)[0]))
    return np.array(probs, np.float32), np.stack(states)


def vad_metrics(ref: np.ndarray, got: np.ndarray, threshold: float = 0.5) -> dict:
    """Speech decision agreement (``prob > threshold``) and mean absolute probability error."""
    return {"decision_agreement": float(np.mean((ref > threshold) == (got > threshold))),
            "prob_mae": float(np.mean(np.abs(ref - got))),
            "prob_max_err": float(np.max(np.abs(ref - got))),
            "speech_fraction_float": float(np.mean(ref > threshold))}
