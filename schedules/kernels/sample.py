"""``psb_sample_kernel``: ``counts[i] = sum_{lo <= j < hi} b_ij`` for a run-time sample range and
seed (the nested stream: the counts of ``[0, 2n)`` are those of ``[0, n)`` plus ``[n, 2n)``)."""

from __future__ import annotations

import tvm
from tvm import te, tirx

from psb_tvm import numerics
from psb_tvm.abi import ATTR_KIND, ATTR_SAMPLER

from ..hash import layer_key, sample_bit, sample_offset, stratified_count
from .layout import _flat_index, _source_index, _storage_shape
from .spec import COUNTS_DTYPE, KernelSpec


def _stratified(spec: KernelSpec, t, seed, i, then):
    """The stratified stream at weight ``i`` (source index) of threshold ``t`` (int32): ``then(c)``
    where ``c(m)`` is the number of ones among its first ``m`` samples (``m`` 0 or a power of two
    <= n_max, in closed form; int32). The weight's rotation is hashed once, however many prefixes
    ``then`` counts."""
    max_log2 = int(spec.n_max).bit_length() - 1

    def counts(o):
        return then(lambda m: stratified_count(o, t, m, spec.P, max_log2))

    return layer_key(seed, spec.layer, lambda key: sample_offset(key, _flat_index(spec.w_shape, i), spec.P, counts))


def psb_sample_kernel(spec: KernelSpec, name: str) -> tvm.tirx.PrimFunc:
    """``(threshold, lo, hi, seed) -> counts``: ones among samples ``lo <= j < hi`` of every weight.

    i.i.d.: a run-time loop over the samples, one hash per sample. Stratified: no loop, the closed
    form ``C(hi) - C(lo)`` per weight, so the cost no longer grows with ``n``; ``lo`` and ``hi``
    must each be 0 or a power of two (``main`` draws ``[0, n)``, refinement ``[n, 2n)``; the
    runtime checks), and at most ``n_max``.
    """
    shape = _storage_shape(spec)
    thr = te.placeholder(shape, spec.threshold_dtype, name="threshold")
    lo = tirx.Var("lo", "int64")
    hi = tirx.Var("hi", "int64")
    seed = tirx.Var("seed", "int64")

    def source(p):
        return _source_index(spec, p) if spec.packed_encoding else p

    if spec.sampler == "stratified":
        def count(*p):
            return _stratified(spec, thr[p].astype("int32"), seed, source(p),
                               lambda c: (c(hi) - c(lo)).astype(COUNTS_DTYPE))

        counts = te.compute(shape, count, name="counts")
        func = te.create_prim_func([thr, lo, hi, seed, counts])
        return func.with_attrs({"global_symbol": name, ATTR_KIND: "sample", ATTR_SAMPLER: "stratified",
                                "op_pattern": 8})
    if spec.sampler != "iid":
        raise ValueError(f"unknown sampler {spec.sampler!r}; expected one of {numerics.SAMPLERS}")
    r = te.reduce_axis((0, hi - lo), name="j")

    def count_iid(*p):
        bit = layer_key(seed, spec.layer, lambda key: sample_bit(key, _flat_index(spec.w_shape, source(p)), lo + r,
                                                                 thr[p].astype("int32"), spec.P))
        return te.sum(bit.astype(COUNTS_DTYPE), axis=r)

    counts = te.compute(shape, count_iid, name="counts")
    func = te.create_prim_func([thr, lo, hi, seed, counts])
    return func.with_attrs({"global_symbol": name, ATTR_KIND: "sample", ATTR_SAMPLER: "iid", "op_pattern": 8})
