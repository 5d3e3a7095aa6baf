"""The compiled-module object: run, export to one ``.so`` with its PSB metadata inside, load back."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .errors import InputError, ModelLoadError

METADATA_FUNC = "psb_metadata"


class PSBModule:
    """A compiled PSB model. ``run(*inputs)`` takes numpy arrays in the model's input order."""

    def __init__(self, lib, metadata: dict, executable=None):
        self._lib = lib
        self._executable = executable  # set when built in this process (export needs it)
        self.metadata = metadata
        self._vm = None

    # ------------------------------------------------------------------ info
    @property
    def inputs(self) -> list:
        """``[(name, shape, dtype)]`` of the compiled model."""
        return [(i["name"], tuple(i["shape"]), i["dtype"]) for i in self.metadata["inputs"]]

    @property
    def layers(self) -> list:
        """Per linear layer: name, op, status ("psb" or "float"), reason, lowering, activation scale."""
        return self.metadata["layers"]

    @property
    def samples(self) -> int:
        return self.metadata["samples"]

    def report(self) -> str:
        """A table of which layers became PSB and why the others stayed float."""
        rows = [("layer", "op", "status", "lowering", "frac bits", "act", "note")]
        for l in self.layers:
            rows.append((l["name"], l["op"], l["status"], l.get("lowering") or "-",
                         str(l.get("frac_bits", "-")), l.get("act_dtype") or "-", l.get("reason") or ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        psb = sum(l["status"] == "psb" for l in self.layers)
        lines.append(f"{psb} of {len(self.layers)} linear layers are PSB (n={self.samples}, seed={self.metadata['seed']})")
        return "\n".join(lines)

    # ------------------------------------------------------------------ run
    def _machine(self):
        if self._vm is None:
            import tvm
            from tvm import relax

            if self.metadata.get("target_kind", "llvm") != "llvm" or not self.metadata.get("host_runnable", True):
                raise RuntimeError(f"this module was built for {self.metadata.get('target')}; it cannot run on this host CPU")
            self._vm = relax.VirtualMachine(self._lib, tvm.cpu())
        return self._vm

    def _check_inputs(self, arrays) -> list:
        expected = self.inputs
        if len(arrays) != len(expected):
            names = [n for n, _, _ in expected]
            raise InputError(f"expected {len(expected)} input(s) {names}, got {len(arrays)}")
        checked = []
        for arr, (name, shape, dtype) in zip(arrays, expected):
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input {name!r}: expected a numpy array, got {type(arr).__name__}")
            if arr.dtype != np.dtype(dtype):
                raise InputError(f"input {name!r}: expected dtype {dtype}, got {arr.dtype}")
            if tuple(arr.shape) != shape:
                raise InputError(f"input {name!r}: expected shape {shape}, got {tuple(arr.shape)}")
            checked.append(np.ascontiguousarray(arr))
        return checked

    def run(self, *inputs):
        """Run the model; returns one array for a single-output model, else a tuple of arrays."""
        import tvm

        arrays = self._check_inputs(inputs)
        vm = self._machine()
        out = vm["main"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays])
        if hasattr(out, "numpy"):
            return out.numpy()
        return tuple(o.numpy() for o in out)

    # ------------------------------------------------------------------ persistence
    def export_library(self, path) -> str:
        """Write one ``.so`` holding code, weights and metadata; written atomically (temp + rename)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cannot export to {path}: directory {directory} does not exist")
        lib = self._executable if self._executable is not None else self._lib
        options = self._export_options()
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".psb_tmp_", dir=directory)
        os.close(fd)
        try:
            lib.export_library(tmp, **options)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def _export_options(self) -> dict:
        """Cross-compiled modules link with the target's toolchain (checked before anything is written)."""
        triple = self.metadata.get("mtriple") or ""
        if not triple.startswith("aarch64"):
            return {}
        import shutil

        from tvm.support import cc

        compiler = "aarch64-linux-gnu-g++"
        if shutil.which(compiler) is None:
            raise RuntimeError(f"exporting an {triple} module needs the cross compiler {compiler} "
                               "(Debian: apt-get install g++-aarch64-linux-gnu)")
        return {"fcompile": cc.cross_compiler(compiler)}

    def __repr__(self):
        psb = sum(l["status"] == "psb" for l in self.layers)
        return f"<PSBModule {self.metadata.get('source')} n={self.samples} psb_layers={psb}/{len(self.layers)} target={self.metadata.get('target')}>"


def load(path) -> PSBModule:
    """Load a ``.so`` written by ``PSBModule.export_library``, metadata included."""
    import tvm
    from tvm import relax

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"compiled module not found: {path}")
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load as a TVM module: {err}") from err
    try:
        vm = relax.VirtualMachine(lib, tvm.cpu())
        text = str(vm[METADATA_FUNC]())
        metadata = json.loads(text)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a psb_tvm module (no readable {METADATA_FUNC}): {err}") from err
    module = PSBModule(lib, metadata)
    module._vm = vm
    return module
