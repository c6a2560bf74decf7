"""`emfm` sets glibc's malloc up per command before any thread starts: blockwise commands cap the
arenas (their peak memory otherwise grows with the number of blocks:
experiments/segmentation/README.md); training commands keep freed memory in the process (a jitted
step's buffers are otherwise faulted in afresh at every step: experiments/benchmarks/README.md)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="malloc arenas and mallopt are glibc's",
)

# threads that allocate, then the number of arenas (heaps) glibc reports
ARENAS = """
import ctypes, json, sys, tempfile, threading
from emfm.cli.main import tune_malloc
print(json.dumps(tune_malloc(sys.argv[1])))
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

# a 64 MiB block allocated, written and freed four times after a first time: the page faults
FAULTS = """
import ctypes, json, resource, sys
from emfm.cli.main import tune_malloc
print(json.dumps(tune_malloc(sys.argv[1])))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():
    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)
touch()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def run(script: str, cmd: str, **env) -> tuple[dict | None, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "EMFM_MALLOC_"))}
    r = subprocess.run(
        [sys.executable, "-c", script, cmd], env={**clean, **env}, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    tuned, count = r.stdout.split("\n")[:2]
    return json.loads(tuned), int(count)


def test_blockwise_commands_cap_malloc_arenas():
    assert run(ARENAS, "instances") == ({"arena_max": 1}, 1)  # one arena, whatever the threads do
    tuned, heaps = run(ARENAS, "instances", EMFM_MALLOC_ARENA_MAX="0")  # glibc's default
    assert tuned is None and heaps > 1
    assert run(ARENAS, "predict", EMFM_MALLOC_ARENA_MAX="2")[0] == {"arena_max": 2}
    assert run(ARENAS, "predict", MALLOC_ARENA_MAX="3")[0] is None  # glibc's own setting wins
    assert run(ARENAS, "view")[0] is None  # other commands keep glibc's default
    r = tune_in_child("predict", EMFM_MALLOC_ARENA_MAX="many")
    assert r.returncode != 0 and "EMFM_MALLOC_ARENA_MAX='many'" in r.stderr


def tune_in_child(cmd: str, **env) -> subprocess.CompletedProcess:
    """`tune_malloc(cmd)` in a fresh interpreter with `env` added."""
    return subprocess.run(
        [sys.executable, "-c", f"from emfm.cli.main import tune_malloc as f; f({cmd!r})"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


def test_training_commands_keep_freed_memory():
    tuned, faults = run(FAULTS, "pretrain")
    assert tuned == {"arena_max": 1, "mmap_max": 0, "trim_threshold": -1}
    assert faults < 1000  # the freed block is reused, not faulted in again
    # glibc's default: the block is a fresh mapping every time, 16 384 pages of 4 KiB each
    tuned, faults = run(FAULTS, "finetune", EMFM_MALLOC_KEEP="0")
    assert tuned is None and faults >= 4 * 16384 // 2
    assert run(FAULTS, "pretrain", MALLOC_MMAP_MAX_="65536")[0] is None  # glibc's own setting wins
    assert run(FAULTS, "main")[0] is None  # the main job's probe and export keep glibc's default
    r = tune_in_child("pretrain", EMFM_MALLOC_KEEP="yes")
    assert r.returncode != 0 and "EMFM_MALLOC_KEEP='yes'" in r.stderr
