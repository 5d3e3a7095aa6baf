"""psb_tvm chooses TVM's thread pool size when the user has not: the physical cores it may use
(TVM's own default, half the hardware threads, is half the cores on a machine without SMT)."""

import os
import subprocess
import sys

from psb_tvm import threads

PROBE = "import psb_tvm, tvm; print(tvm.get_global_func('runtime.NumThreads')())"


def _pool_size(env_value):
    env = {k: v for k, v in os.environ.items() if k != threads.ENV}
    if env_value is not None:
        env[threads.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_unset_means_the_physical_cores_and_a_user_choice_is_kept():
    assert _pool_size(None) == threads.physical_cores()
    assert _pool_size("1") == 1


def test_cpu_lists_and_core_count():
    assert threads._count_cpus("0") == 1 and threads._count_cpus("0,4") == 2 and threads._count_cpus("0-3,8") == 5
    assert 1 <= threads.physical_cores() <= (os.cpu_count() or 1)
