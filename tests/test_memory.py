"""``bmm_jax.memory``: the glibc allocator policy and the RSS readers."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import bmm_jax.memory as memory


def test_rss_readers_are_consistent():
    now, peak = memory.rss_bytes(), memory.peak_rss_bytes()
    # the kernel batches per-thread RSS counters, so the two may disagree by a little
    assert 0 < now <= peak + (64 << 20) and peak > (16 << 20)


@pytest.mark.parametrize("bad", [0, -1, 64 << 20, 1.5, True, "1M"])
def test_release_freed_memory_rejects_bad_thresholds(bad):
    with pytest.raises(ValueError, match="threshold_bytes"):
        memory.release_freed_memory(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_release_freed_memory_returns_large_buffers_to_the_os():
    # in a fresh process: allocate and free 200 buffers of 4 MiB interleaved with small live ones;
    # with the policy applied the freed buffers leave the process (RSS drops back)
    child = textwrap.dedent("""
        import sys
        import numpy as np
        import bmm_jax.memory as memory
        if sys.argv[1] == "on":
            assert memory.release_freed_memory()
        base = memory.rss_bytes()
        keep, big = [], []
        for i in range(200):
            big.append(np.ones(1 << 20, np.float32))      # 4 MiB, touched
            keep.append(np.ones(1000, np.float32))
        del big
        print((memory.rss_bytes() - base) / 2 ** 20)
    """)
    out = {}
    for mode in ("on", "off"):
        proc = subprocess.run([sys.executable, "-c", child, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = float(proc.stdout.split()[-1])
    assert out["on"] < 100.0                 # < 1/8 of the 800 MiB allocated is still resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_reset_peak_rss_measures_one_phase():
    # fresh process: a 400 MiB buffer raises the peak; after freeing it and resetting, the peak of
    # the next phase (a 40 MiB buffer) is far below it
    child = textwrap.dedent("""
        import numpy as np
        import bmm_jax.memory as memory
        a = np.ones(100 << 20, np.float32); del a
        first = memory.peak_rss_bytes()
        assert memory.reset_peak_rss()
        b = np.ones(10 << 20, np.float32)
        second = memory.peak_rss_bytes()
        print(first >> 20, second >> 20)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = map(int, proc.stdout.split()[-2:])
    assert first >= 400
    assert second < first - 300
