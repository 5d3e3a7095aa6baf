"""The one way the PSB passes change a module: a copy with some functions replaced or added
(passes must not mutate the module they are given)."""

from __future__ import annotations

import tvm


def with_functions(mod: tvm.IRModule, functions: dict) -> tvm.IRModule:
    """A copy of ``mod`` where each ``{GlobalVar or name: function}`` replaces or adds a function;
    ``mod`` itself when there is nothing to change."""
    if not functions:
        return mod
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions))
    for key, func in functions.items():
        mod[key] = func
    return mod
