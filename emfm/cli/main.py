"""`emfm <command> [hydra overrides]`: dispatch to thin Hydra apps over library functions.

Each command composes `configs/<command>.yaml` against the typed schema (emfm.config.schema), so an
unknown key or a wrong type stops the run before any compute with Hydra's message naming the key.
Known bad input (missing path, wrong dtype or shape, bad value) ends with one line `emfm: error:
...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

COMMANDS = {
    "main": "the main job: pretrain + probe (pretrained vs random) + export on the bundled EM "
    "sample",
    "pretrain": "self-supervised pretraining of an encoder",
    "probe": "linear probe of a checkpoint's frozen features (checkpoint=RUN_DIR; none = random "
    "init); benchmark: checkpoints=[...]",
    "export": "dense features of a volume to zarr (checkpoint=RUN_DIR)",
    "discover": "k-means clusters of exported features: label volume, galleries (discover "
    "features=PATH k=8)",
    "evaluate": "segmentation metrics: evaluate pred=PATH gt=PATH "
    "[kinds=[region,instance,warping]]",
    "instances": "instance labels from probabilities/affinities: instances input=ZARR out=ZARR "
    "method=watershed|link2d|agglomeration|multicut|mws",
    "finetune": "train a segmentation model: finetune [regime=frozen checkpoint=RUN] "
    "[task=affinity] [head=progressive]",
    "predict": "blockwise probabilities of a volume to zarr: predict checkpoint=FINETUNE_RUN "
    "predict.path=VOL",
}


def config_dir() -> str:
    from emfm.config.paths import config_dir as _config_dir

    return _config_dir()


def _usage() -> str:
    lines = [
        "usage: emfm <command> [key=value ...] [-m for sweeps] [--cfg job to print the config]",
        "",
        "commands:",
    ]
    lines += [f"  {k:<10} {v}" for k, v in COMMANDS.items()]
    lines += [
        f"  {'data':<10} data import SRC DST (TIFF/HDF5 -> OME-Zarr) | data info PATH",
        f"  {'runs':<10} runs summarize DIR: table and loss curves over a sweep's runs",
        f"  {'zoo':<10} zoo list: the pretrained checkpoints shipped with emfm (use as "
        "checkpoint=zoo:NAME)",
        f"  {'view':<10} view PATH... [--port N] [--bind ADDR]: volumes and run directories in "
        "neuroglancer",
        f"  {'export-model':<10} export-model checkpoint=RUN_DIR|zoo:NAME format=onnx|bioimageio "
        "[out=PATH] "
        "[shape=1,1,256,256]: the model as ONNX or a BioImage.IO package (export-model --help)",
    ]
    lines += [
        "",
        "examples:",
        "  emfm main",
        "  emfm main debug=tiny",
        "  emfm pretrain trainer.steps=2000 data.path=/data/vol.zarr",
        "  emfm probe checkpoint=runs/pretrain/2026-01-01_00-00-00",
        "  emfm pretrain -m model=vit_ti_p8,vit_s16 objective.mask_ratio=0.6,0.75"
        "   (a local sweep)",
        "  emfm pretrain -m hydra/launcher=slurm hydra.launcher.partition=gpu ..."
        "   (a Slurm sweep)",
    ]
    return "\n".join(lines)


BLOCKWISE = ("predict", "instances")  # commands whose memory must not grow with the volume
# commands that run jitted training steps (not `main`: its probe and export stages hold large
# arrays of many sizes, and kept memory raised its peak RSS from 5.4 to 6.5 GB, no faster)
TRAINING = ("pretrain", "finetune")
# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
GLIBC_ENV = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
)


def _env_int(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(
            f"emfm: error: {name}={raw!r}: give a whole number (0 = glibc's default)"
        ) from None


def tune_malloc(cmd: str) -> dict[str, int] | None:
    """Set glibc's malloc up for `cmd` before any thread starts; returns what was set (None: left
    alone). Nothing is set off Linux/glibc or where the environment holds glibc's own MALLOC_*
    settings (they are left to glibc).

    Blockwise commands (predict, instances): one arena. glibc gives threads that allocate under
    contention arenas of their own and keeps freed memory in them, so tensorstore's I/O threads
    raised the peak RSS of `emfm instances` with the number of blocks (4 -> 16 x 1024^2 at
    identical blocks: 289 -> 358 MB; capped at 1 arena: 259 -> 259 MB, same speed;
    experiments/segmentation/README.md). EMFM_MALLOC_ARENA_MAX (default 1; 0 = glibc's default)
    sets the cap.

    Training commands (pretrain, finetune): freed memory stays in the process. XLA's CPU
    runtime allocates a step's buffers afresh at every execution; with glibc's defaults the large
    ones are new mappings (or trimmed heap) that the kernel faults in page by page at every step:
    1.58 million page faults and 5-7 s of system time per MAE ViT-S/16 step of batch 32 on a 2-core
    CPU. Keeping the memory (one arena, no mmap, no trimming: mallopt's int -1 becomes glibc's
    largest size_t, a cap of 2 GiB would still trim a step's freed buffers) removes the faults with
    identical losses (benchmarks/mae_step_malloc.py, experiments/benchmarks/README.md); the
    resident memory then stays at its peak until the process ends. EMFM_MALLOC_KEEP=0 leaves
    glibc's defaults."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in GLIBC_ENV):
        return None
    if cmd in BLOCKWISE:
        n = _env_int("EMFM_MALLOC_ARENA_MAX", "1")
        want = {"arena_max": n} if n > 0 else {}
    elif cmd in TRAINING:
        want = (
            {"arena_max": 1, "mmap_max": 0, "trim_threshold": -1}
            if _env_int("EMFM_MALLOC_KEEP", "1") > 0
            else {}
        )
    else:
        return None
    if not want:
        return None
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no arenas and no mallopt)
        return None
    params = {"arena_max": M_ARENA_MAX, "mmap_max": M_MMAP_MAX, "trim_threshold": M_TRIM_THRESHOLD}
    done = {k: v for k, v in want.items() if mallopt(params[k], v) == 1}  # 1 on success
    return done or None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "data":  # `emfm data import|info ...`: argparse utilities, no Hydra
        from emfm.cli import data

        data.main(rest)
        return
    if cmd == "runs":  # `emfm runs summarize DIR`
        from emfm.cli import runs

        runs.main(rest)
        return
    if cmd == "view":  # `emfm view PATH...`: neuroglancer, serves until Ctrl-C
        from emfm.cli import view

        view.main(rest)
        return
    if (
        cmd == "export-model"
    ):  # `emfm export-model checkpoint=... format=onnx|bioimageio`: key=value, no Hydra
        from emfm.cli import export_model

        export_model.main(rest)
        return
    if cmd == "zoo":  # `emfm zoo list`
        zoo_main(rest)
        return
    if cmd not in COMMANDS:
        print(f"emfm: error: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    tune_malloc(cmd)
    from emfm.cli import apps

    sys.argv = [f"emfm {cmd}"] + rest
    apps.run(cmd, config_dir())


def zoo_main(argv: list[str]) -> None:
    from emfm import zoo

    if any(a in ("-h", "--help") for a in argv):
        print("usage: emfm zoo list\n\nOne line per checkpoint of the zoo, starting with its name")
        print("(use it as checkpoint=zoo:NAME wherever a checkpoint is accepted).")
        return
    if argv[:1] != ["list"] or len(argv) > 1:
        print("usage: emfm zoo list", file=sys.stderr)
        raise SystemExit(2)
    lines = zoo.list_lines()
    print("\n".join(lines) if lines else "(no checkpoints in the zoo)")


if __name__ == "__main__":
    main()
