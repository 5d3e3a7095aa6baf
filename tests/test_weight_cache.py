"""The weight cache of modules sampled at run time: same bits as sampling every call, LRU within a
byte bound, invalidated by n and seed, safe from several threads."""

import threading

import numpy as np
import pytest
import tvm

import psb_tvm
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.weight_cache import WeightCache, tensor_bytes

SHAPES = {"input": (10, 1, 8, 8)}


def _run_threads(worker, count: int) -> None:
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _tensors(nbytes: int, value: int = 0) -> list:
    return [tvm.runtime.tensor(np.full(nbytes, value, np.int8))]


def test_lru_evicts_least_recent_within_the_byte_bound():
    cache = WeightCache(max_bytes=300)
    made = []

    def make(key, size=100):
        def f():
            made.append(key)
            return _tensors(size)
        return f

    for key in "abc":
        cache.get(key, make(key))
    assert cache.stats()["bytes"] == 300 and cache.stats()["entries"] == 3
    cache.get("a", make("a"))  # hit: a becomes the most recent
    cache.get("d", make("d"))  # evicts b, the least recent
    assert "b" not in cache and all(k in cache for k in "acd")
    assert made == ["a", "b", "c", "d"]
    st = cache.stats()
    assert (st["hits"], st["misses"], st["bytes"]) == (1, 4, 300)
    big = cache.get("e", make("e", 1000))  # larger than the bound: returned, not kept
    assert tensor_bytes(big[0]) == 1000 and "e" not in cache and cache.stats()["bytes"] == 300
    cache.max_bytes = 150  # shrinking evicts down to the bound
    assert cache.stats()["entries"] == 1 and "d" in cache
    cache.max_bytes = 0
    assert cache.stats()["entries"] == 0 and not cache.enabled
    cache.get("f", make("f"))
    assert "f" not in cache
    with pytest.raises(psb_tvm.ConfigError, match="max_bytes"):
        cache.max_bytes = -1
    with pytest.raises(psb_tvm.ConfigError, match="max_bytes"):
        WeightCache(max_bytes=1.5)


def test_cache_structure_survives_many_threads():
    """16 threads hammering 8 keys on a cache that holds 4: every value returned is the key's own,
    and the byte count matches the entries left."""
    cache = WeightCache(max_bytes=4 * 64)
    errors = []

    def worker(t):
        rng = np.random.default_rng(t)
        for _ in range(300):
            k = int(rng.integers(8))
            got = cache.get(k, lambda k=k: _tensors(64, k))
            if int(got[0].numpy()[0]) != k:
                errors.append((k, int(got[0].numpy()[0])))

    _run_threads(worker, 16)
    assert not errors
    st = cache.stats()
    assert st["entries"] <= 4 and st["bytes"] == 64 * st["entries"]
    assert st["hits"] + st["misses"] == 16 * 300


@pytest.fixture(scope="module")
def module():
    x_train, _, x_test, _ = load_digits_split()
    m = psb_tvm.compile(DIGITS_ONNX, samples=8, seed=0, input_shapes=SHAPES, calibration={"input": x_train[:100]})
    return m, x_test[:10], x_test[10:20]


def _main(m, x, n, seed):
    """What ``run`` computed before the cache: ``main`` samples and packs on every call."""
    L = len(m.psb_layers)
    return m._machine()["main"](tvm.runtime.tensor(x), tvm.runtime.ShapeTuple([n] * L), tvm.runtime.ShapeTuple([seed])).numpy()


def test_cached_runs_equal_sampling_every_call(module):
    m, x, x2 = module
    assert m.metadata["weight_cache"] and m.metadata["sampler"] == "stratified"
    # thresholds stored in 16 bits where they fit (all of the digits CNN's): the same draws
    assert {l["threshold_dtype"] for l in m.layers} == {"uint16"}
    m.weight_cache.clear()
    before = m.weight_cache.stats()
    first = m.run(x, samples=8, seed=3)
    again = m.run(x2, samples=8, seed=3)  # other inputs, same configuration: a hit
    st = m.weight_cache.stats()
    assert (st["misses"] - before["misses"], st["hits"] - before["hits"], st["entries"]) == (1, 1, 1)
    assert np.array_equal(first.view(np.int32), _main(m, x, 8, 3).view(np.int32))
    assert np.array_equal(again.view(np.int32), _main(m, x2, 8, 3).view(np.int32))
    # A new seed or a new n is another entry (not a stale hit), with its own bits.
    for n, seed in [(8, 4), (16, 3), (8, 3)]:
        assert np.array_equal(m.run(x, samples=n, seed=seed).view(np.int32), _main(m, x, n, seed).view(np.int32))
    st2 = m.weight_cache.stats()
    assert st2["entries"] == 3 and st2["misses"] - st["misses"] == 2 and st2["hits"] - st["hits"] == 1
    # Per-layer maps are keyed by every layer's n.
    per_layer = {"/conv1/Conv": 4, "default": 8}
    assert not np.array_equal(m.run(x, samples=per_layer, seed=3), first)
    assert m.weight_cache.stats()["entries"] == 4


def test_memory_bound_and_disabling(module):
    m, x, _ = module
    m.weight_cache.clear()
    m.run(x, samples=8, seed=1)
    one = m.weight_cache.stats()["bytes"]
    assert one > 0
    m.weight_cache.max_bytes = one  # room for one configuration
    try:
        m.run(x, samples=8, seed=2)
        st = m.weight_cache.stats()
        assert st["entries"] == 1 and st["bytes"] == one
        m.weight_cache.max_bytes = 0  # disabled: run() samples every call, same bits
        assert np.array_equal(m.run(x, samples=8, seed=2), _main(m, x, 8, 2))
        assert m.weight_cache.stats()["entries"] == 0
    finally:
        m.weight_cache.max_bytes = 256 << 20


def test_one_module_from_several_threads(module):
    """Threads get their own virtual machine and share the cache: every result equals the
    single-threaded one."""
    m, x, x2 = module
    m.weight_cache.clear()
    want = {(n, s): _main(m, x, n, s) for n in (4, 8) for s in (0, 1)}
    errors = []

    def worker(t):
        for i in range(12):
            n, s = (4, 8)[(t + i) % 2], (i // 2) % 2
            if not np.array_equal(m.run(x, samples=n, seed=s), want[(n, s)]):
                errors.append((t, i))

    _run_threads(worker, 4)
    assert not errors
    assert m.weight_cache.stats()["entries"] == 4
