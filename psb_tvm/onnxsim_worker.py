"""onnxsim in a separate process, so that a crash in it cannot take the compiling process down.

onnxsim is native code; on some inputs it segfaults (measured: a model with external data, run
from its own directory, killed ``psb-tvm compile`` with signal 11). One worker process (plain
``python``, importing only onnx and onnxsim) is started on first use and kept: the start costs
~1.5 s once, a call then costs the model's serialisation. When the worker dies or fails, the
caller gets ``(None, reason)``, imports the unsimplified model and warns; the next call starts a
new worker. Set ``PSB_TVM_ONNXSIM=inprocess`` to run onnxsim in this process instead (no isolation).
"""

from __future__ import annotations

import atexit
import os
import struct
import subprocess
import sys
import threading

import onnx

#: Models at or over protobuf's 2 GiB limit cannot be serialised for onnxsim (nor by it).
MAX_BYTES = 2**31 - 1

_LEN = struct.Struct("<Q")
# The worker: read (length, model bytes), answer (status byte, length, payload); status 0: the
# simplified model, 1: onnxsim could not validate it (empty payload), 2: an error message.
_WORKER = r"""
import struct, sys, warnings
import onnx, onnxsim
L = struct.Struct("<Q")
inp, out = sys.stdin.buffer, sys.stdout.buffer
def read(n):
    data = inp.read(n)
    if len(data) != n:
        sys.exit(0)
    return data
while True:
    model = onnx.ModelProto()
    model.ParseFromString(read(L.unpack(read(L.size))[0]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            simplified, ok = onnxsim.simplify(model)
        status, payload = (0, simplified.SerializeToString()) if ok else (1, b"")
    except Exception as err:
        status, payload = 2, f"{type(err).__name__}: {err}".encode()[:4000]
    out.write(bytes([status]) + L.pack(len(payload)) + payload)
    out.flush()
"""

_lock = threading.Lock()
_proc: subprocess.Popen | None = None


def _worker() -> subprocess.Popen:
    global _proc
    if _proc is None or _proc.poll() is not None:
        _proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
    return _proc


@atexit.register
def _stop() -> None:
    """Close the worker's input (it exits on end of file) and reap it."""
    if _proc is not None and _proc.poll() is None:
        try:
            _proc.stdin.close()
            _proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            _proc.kill()
    if _proc is not None:
        _proc.stdout.close()


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def simplify(proto: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """``(simplified model, "")``, or ``(None, why not)`` when onnxsim fails, rejects its own
    result, crashes, or the model is too large to serialise."""
    size = proto.ByteSize()
    if size > MAX_BYTES:
        return None, f"the model is {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit"
    if os.environ.get("PSB_TVM_ONNXSIM", "") == "inprocess":
        import onnxsim

        try:
            simplified, ok = onnxsim.simplify(proto)
        except Exception as err:  # noqa: BLE001 - onnxsim raises many types on exotic models
            return None, f"onnxsim failed ({type(err).__name__}: {err})"
        return (simplified, "") if ok else (None, "onnxsim could not validate its simplification")
    data = proto.SerializeToString()
    with _lock:
        proc = _worker()
        try:
            proc.stdin.write(_LEN.pack(len(data)) + data)
            proc.stdin.flush()
            status = _read(proc.stdout, 1)[0]
            payload = _read(proc.stdout, _LEN.unpack(_read(proc.stdout, _LEN.size))[0])
        except (EOFError, BrokenPipeError, OSError):
            code = proc.wait()
            why = f"signal {-code}" if code < 0 else f"exit status {code}"
            return None, f"onnxsim crashed ({why}) in its worker process"
    if status == 0:
        result = onnx.ModelProto()
        result.ParseFromString(payload)
        return result, ""
    if status == 1:
        return None, "onnxsim could not validate its simplification"
    return None, f"onnxsim failed ({payload.decode(errors='replace')})"
