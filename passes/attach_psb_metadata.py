"""Attach the module's metadata (JSON) as the Relax function ``psb_metadata() -> str``, so it
travels inside the exported library; the runtime and the C++ runner read it from there."""

from __future__ import annotations

import json

import tvm
from tvm import relax, tirx

from psb_tvm.abi import METADATA_FUNC
from psb_tvm.metadata import ModuleMetadata

from .apply_psb_tuning_database import tuned_kernels
from .module_copy import with_functions


def attach_string(mod: tvm.IRModule, name: str, text: str) -> tvm.IRModule:
    """A copy of ``mod`` with a Relax function ``name() -> str`` returning ``text``."""
    value = tvm.ir.StringImm(text)
    func = relax.Function([], relax.SeqExpr([], value), ret_ty=value.ty, is_pure=True)
    return with_functions(mod, {name: func.with_attr("global_symbol", name)})


def schedule_summary(mod: tvm.IRModule) -> dict:
    """The ``schedules`` entry of the metadata: how many kernels a tuning database scheduled
    (``psb.tuned``), how many got the default rules, and the tuned kernels' names."""
    names = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    tuned = tuned_kernels(mod)
    return {"tuned": len(tuned), "default": len(names) - len(tuned), "tuned_kernels": sorted(tuned)}


@tvm.transform.module_pass(opt_level=0, name="AttachPSBMetadata")
class AttachPSBMetadata:
    """Add ``psb_metadata()`` returning ``metadata`` (a ``ModuleMetadata``, or any JSON-able dict)
    as JSON, with its ``schedules`` entry filled in from the module (run it after scheduling).
    ``metadata`` is updated in place, so the caller sees the entry too."""

    def __init__(self, metadata):
        self.metadata = metadata

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        summary = schedule_summary(mod)
        if isinstance(self.metadata, ModuleMetadata):
            self.metadata.schedules = summary
            text = self.metadata.to_json()
        else:
            self.metadata["schedules"] = summary
            text = json.dumps(self.metadata)
        return attach_string(mod, METADATA_FUNC, text)
