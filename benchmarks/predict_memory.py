"""Peak memory of `emfm predict` (probabilities + stitched instances) does not grow with the volume,
shown under a hard memory cap smaller than the volume held in one piece.

For each volume size: writes a zarr v3 uint8 volume of real EM (the bundled ISBI sections, tiled
over each section, one section in memory at a time), then, in a memory cgroup capped at `--cap-mb`:
  1. a control: numpy loads the whole volume and allocates its float32 probabilities in one piece
     (expected to be killed by the cap when that exceeds it: shows the cap is enforced);
  2. `emfm predict checkpoint=CKPT predict.path=VOL predict.instances=watershed ...`, the CLI, as a
     child process; its peak resident memory comes from wait4's rusage (ru_maxrss) and the
     cgroup's high-water mark (memory.max_usage_in_bytes, page cache included).
The cap is a cgroup (v1 memory controller, or v2 memory.max), which bounds resident memory; an
address-space limit (`prlimit --as` / `ulimit -v`) cannot be used with JAX, which reserves far more
virtual memory than it touches. The record goes into experiments/benchmarks/predict_memory.json
under a variant key (`--variant`; default from the malloc arena settings of the environment:
`cli_arena_cap` with the CLI's own cap, `glibc_default_arenas` with EMFM_MALLOC_ARENA_MAX=0,
`arenaN` with MALLOC_ARENA_MAX=N); the other variants in the file are kept.

  PYTHONPATH=. python benchmarks/predict_memory.py --checkpoint FINETUNE_RUN \
      [--sizes 6,2048,2048:24,2048,2048] [--cap-mb 800] [--work DIR] [--out JSON] [--variant NAME]

`--checkpoint` is any `emfm finetune` run of a 2D model with a 2-class semantic task (channel 1 =
membrane); empty = train a tiny one first (width 32, depth 1, 150 steps on the bundled sample).
Needs permission to create a memory cgroup (root in a container); otherwise it stops with the
reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMFM = [sys.executable, "-m", "emfm.cli.main"]


class MemoryCgroup:
    """A child memory cgroup with a hard limit; processes are started inside it via `prefix()`."""

    def __init__(self, name: str, limit_mb: int):
        v1 = Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "memory.limit_in_bytes").exists():
            self.path, self.limit_file, self.peak_file = (
                v1 / name,
                "memory.limit_in_bytes",
                "memory.max_usage_in_bytes",
            )
        elif (v2 / "cgroup.controllers").exists() and "memory" in (
            v2 / "cgroup.controllers"
        ).read_text():
            self.path, self.limit_file, self.peak_file = v2 / name, "memory.max", "memory.peak"
        else:
            raise SystemExit(
                "predict_memory: no cgroup memory controller found under /sys/fs/cgroup"
            )
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / self.limit_file).write_text(str(limit_mb << 20))
            if (self.path / "memory.swappiness").exists():
                (self.path / "memory.swappiness").write_text("0")
        except OSError as e:
            raise SystemExit(f"predict_memory: cannot create memory cgroup {self.path}: {e}") from e
        self.limit_mb = limit_mb

    def reset_peak(self) -> None:
        try:
            (self.path / self.peak_file).write_text("0")
        except OSError:
            pass

    def peak_mb(self) -> float | None:
        try:
            return int((self.path / self.peak_file).read_text()) / 2**20
        except (OSError, ValueError):
            return None

    def run(self, cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
        """Run `cmd` inside the cgroup; returns exit code, peak RSS of that process, cgroup peak,
        wall."""
        self.reset_peak()
        procs = self.path / "cgroup.procs"
        t0 = time.perf_counter()
        p = subprocess.Popen(
            ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        out, _ = p.communicate(timeout=timeout)
        return {
            "returncode": p.returncode,
            "wall_s": time.perf_counter() - t0,
            "cgroup_peak_mb": self.peak_mb(),
            "output_tail": out[-2000:],
        }

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def rss_wrapper(cmd: list[str]) -> list[str]:
    """`cmd` run by a tiny Python parent that prints the child's peak RSS (wait4 rusage, MB)
    last."""
    code = (
        "import json,os,subprocess,sys;p=subprocess.Popen(sys.argv[1:]);_,st,ru=os.wait4(p.pid,0);"
        "print('PEAK_RSS_MB',json.dumps({'rss_mb':ru.ru_maxrss/1024,'status':os.waitstatus_to_exitcode(st)}),"
        "flush=True);sys.exit(0)"
    )
    return [sys.executable, "-c", code, *cmd]


def provenance() -> dict:
    """Date (UTC) and commit of this checkout ("+dirty" with uncommitted changes), for records."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit}


def write_variant(dst: Path, variant: str, record: dict) -> None:
    """Store `record` under `variant` in the JSON file `dst`, keeping its other variants."""
    whole = json.loads(dst.read_text()) if dst.exists() else {}
    whole[variant] = record
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(whole, indent=1) + "\n")


def default_variant() -> str:
    """The variant key that describes this environment's malloc arena settings."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return f"arena{os.environ['MALLOC_ARENA_MAX']}"
    if os.environ.get("EMFM_MALLOC_ARENA_MAX") == "0":
        return "glibc_default_arenas"
    return "cli_arena_cap"


def parse_peak(out: str) -> dict:
    for ln in reversed(out.splitlines()):
        if ln.startswith("PEAK_RSS_MB "):
            return json.loads(ln.split(" ", 1)[1])
    return {}


def write_tiled_volume(path: Path, shape: tuple[int, int, int]) -> None:
    """Real EM of any size: section z is bundled section z % n tiled over (y, x), mirrored tiles."""
    import numpy as np

    from emfm.data import bundled
    from emfm.data.volume import create_volume, open_volume

    src = open_volume(bundled.sample_raw())
    if path.exists():
        shutil.rmtree(path)
    v = create_volume(path, shape, np.uint8, chunks=(1, 512, 512))
    for z in range(shape[0]):
        s = src.read((slice(z % src.shape[0], z % src.shape[0] + 1),))[0]
        tile = np.block([[s, s[:, ::-1]], [s[::-1], s[::-1, ::-1]]])
        reps = (-(-shape[1] // tile.shape[0]), -(-shape[2] // tile.shape[1]))
        v.array[z].write(np.tile(tile, reps)[: shape[1], : shape[2]]).result()


def train_tiny(run_dir: Path, env: dict) -> None:
    cmd = [
        *EMFM,
        "finetune",
        "model.width=32",
        "model.depth=1",
        "model.heads=2",
        "head=progressive",
        "head.width=16",
        "trainer.steps=150",
        "data.batch_size=4",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        f"run_dir={run_dir}",
    ]
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--sizes", default="6,2048,2048:24,2048,2048")
    ap.add_argument("--cap-mb", type=int, default=800)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "emfm_predict_memory"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument(
        "--cache-mb", type=int, default=64, help="EMFM_CHUNK_CACHE_MB of the predict process"
    )
    ap.add_argument(
        "--instance-block",
        default="8,256,256",
        help="instances.block (z,y,x): instance memory is one block with its halo, so size it to "
        "the cap",
    )
    ap.add_argument(
        "--out",
        default="experiments/benchmarks/predict_memory.json",
        help="the JSON file (relative to the repo root) that holds the record under --variant",
    )
    ap.add_argument(
        "--variant",
        default=default_variant(),
        help="key of this run's record in --out (default: from the malloc arena settings)",
    )
    ap.add_argument(
        "--from-log", help="rewrite the JSON from the records a run printed (one JSON per line)"
    )
    a = ap.parse_args()
    if a.from_log:
        lines = [
            json.loads(ln) for ln in Path(a.from_log).read_text().splitlines() if ln.startswith("{")
        ]
        recs = [r for r in lines if "volume" in r]
        keys = ("cap_mb", "checkpoint", "window", "chunk", "chunk_cache_mb", "instance_block")
        settings = {k: v for k, v in lines[-1].items() if k in keys}
        write_summary(recs, settings, REPO / a.out, a.variant)
        return
    sys.path.insert(0, str(REPO))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "EMFM_CHUNK_CACHE_MB": str(a.cache_mb)}
    ckpt = a.checkpoint
    if not ckpt:
        ckpt = str(work / "tiny_model")
        if not (Path(ckpt) / "finetune_summary.json").exists():
            train_tiny(Path(ckpt), env)
    started = provenance()
    cg = MemoryCgroup(f"emfm_predict_memory_{os.getpid()}", a.cap_mb)
    records = []
    try:
        for size in a.sizes.split(":"):
            shape = tuple(int(v) for v in size.split(","))
            voxels = math.prod(shape)
            # uint8 input + float32 probabilities of 2 classes
            one_piece_mb = voxels * (1 + 2 * 4) / 2**20
            vol = work / f"vol_{'x'.join(map(str, shape))}.zarr"
            t0 = time.perf_counter()
            write_tiled_volume(vol, shape)
            gen_s = time.perf_counter() - t0
            load = (
                f"import numpy as np,sys;sys.path.insert(0,{str(REPO)!r});"
                "from emfm.data.volume import open_volume;"
                f"x=open_volume({str(vol)!r}).read();p=np.empty(x.shape+(2,),np.float32);p[...]=1.0;"
                "print('loaded',x.nbytes+p.nbytes)"
            )
            control = cg.run(rss_wrapper([sys.executable, "-c", load]), env=env)
            control.update(parse_peak(control["output_tail"]))
            out = work / f"pred_{'x'.join(map(str, shape))}.zarr"
            for p in (out, Path(str(out)[:-5] + "_instances.zarr"), work / "run"):
                shutil.rmtree(p, ignore_errors=True)
            w, c = a.window, a.chunk
            cmd = [
                *EMFM,
                "predict",
                f"checkpoint={ckpt}",
                f"predict.path={vol}",
                f"predict.out={out}",
                f"predict.window=[1,{w},{w}]",
                "predict.overlap=[0,32,32]",
                f"predict.chunk=[1,{c},{c}]",
                "predict.batch_size=4",
                "predict.dtype=float32",
                "predict.resume=false",
                "predict.instances=watershed",
                "instances.channel=1",
                f"instances.block=[{a.instance_block}]",
                "instances.halo=[2,32,32]",
                "trainer.progress=false",
                f"run_dir={work / 'run'}",
            ]
            res = cg.run(rss_wrapper(cmd), env=env)
            res.update(parse_peak(res["output_tail"]))
            pred = (
                json.loads((work / "run" / "predict.json").read_text())
                if res.get("status") == 0
                else {}
            )
            rec = {
                "volume": list(shape),
                "voxels": voxels,
                "one_piece_mb": one_piece_mb,
                "cap_mb": a.cap_mb,
                "generate_s": gen_s,
                "numpy_whole_volume": {
                    "exit": control.get("status"),
                    "rss_mb": control.get("rss_mb"),
                    "killed_by_cap": control.get("status") not in (0, None),
                },
                "predict": {
                    "exit": res.get("status"),
                    "peak_rss_mb": res.get("rss_mb"),
                    "cgroup_peak_mb": res["cgroup_peak_mb"],
                    "wall_s": res["wall_s"],
                    "voxels_per_s": pred.get("voxels_per_s"),
                    "predict_s": pred.get("seconds"),
                    "instances": pred.get("instances"),
                },
                "command": " ".join(["emfm", *cmd[3:]]),
            }
            if res.get("status") != 0:
                rec["predict"]["output_tail"] = res["output_tail"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
            shutil.rmtree(vol, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(Path(str(out)[:-5] + "_instances.zarr"), ignore_errors=True)
    finally:
        cg.remove()
    write_summary(
        records,
        {
            "cap_mb": a.cap_mb,
            "checkpoint": ckpt,
            "window": a.window,
            "chunk": a.chunk,
            "chunk_cache_mb": a.cache_mb,
            "instance_block": a.instance_block,
            **started,
        },
        REPO / a.out,
        a.variant,
    )


def write_summary(records: list[dict], settings: dict, dst: Path, variant: str) -> None:
    """The record, stored under `variant` in `dst` (experiments/benchmarks/predict_memory.json by
    default); the RSS ratio only when every run finished (a run the cap killed is recorded with its
    exit status -9 and the RSS it had reached)."""
    ok = all(r["predict"]["exit"] == 0 for r in records)
    rss = [r["predict"]["peak_rss_mb"] for r in records]
    summary = {
        **settings,
        "records": records,
        "all_finished": ok,
        "voxel_ratio": records[-1]["voxels"] / records[0]["voxels"],
        "peak_rss_ratio": rss[-1] / rss[0] if ok else None,
    }
    write_variant(dst, variant, summary)
    print(json.dumps({"variant": variant, **{k: v for k, v in summary.items() if k != "records"}}))


if __name__ == "__main__":
    main()
