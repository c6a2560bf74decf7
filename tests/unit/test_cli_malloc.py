"""`emfm predict|instances` cap glibc's malloc arenas before any thread starts (the peak memory of
blockwise runs otherwise grows with the number of blocks: experiments/segmentation/README.md)."""

import os
import subprocess
import sys

import pytest

# threads that allocate, then the number of arenas (heaps) glibc reports
PROBE = """
import ctypes, sys, tempfile, threading
from emfm.cli.main import limit_malloc_arenas
print(limit_malloc_arenas(sys.argv[1]))
def work():
    bufs = [ctypes.create_string_buffer(1 << 16) for _ in range(64)]
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp)); libc.fclose(ctypes.c_void_p(fp))
    print(open(f.name).read().count("<heap nr="))
"""


def probe(cmd: str, **env) -> tuple[str, int]:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_ARENA_MAX", "EMFM_MALLOC_ARENA_MAX")
    }
    r = subprocess.run(
        [sys.executable, "-c", PROBE, cmd], env={**e, **env}, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    cap, heaps = r.stdout.split()
    return cap, int(heaps)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="malloc arenas are glibc's",
)
def test_blockwise_commands_cap_malloc_arenas():
    assert probe("instances") == ("1", 1)  # default: one arena, whatever the threads do
    # glibc's default: an arena per thread
    cap, heaps = probe("instances", EMFM_MALLOC_ARENA_MAX="0")
    assert cap == "None" and heaps > 1
    assert probe("predict", EMFM_MALLOC_ARENA_MAX="2")[0] == "2"
    assert probe("finetune")[0] == "None"  # training keeps glibc's default
    assert probe("predict", MALLOC_ARENA_MAX="3")[0] == "None"  # glibc's own setting is left to it
    r = subprocess.run(
        [sys.executable, "-c", "from emfm.cli.main import limit_malloc_arenas as f; f('predict')"],
        env={**os.environ, "EMFM_MALLOC_ARENA_MAX": "many"},
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "EMFM_MALLOC_ARENA_MAX='many'" in r.stderr
