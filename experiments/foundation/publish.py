"""Publish a pretraining run as a zoo checkpoint (emfm/zoo_models/NAME) with its model card.

    python experiments/foundation/publish.py RUN_DIR NAME [--benchmark BENCH_DIR] [--overwrite]
    [--card-only] [--finetune FINETUNE_RESULTS_JSONL]

The card names the data (with licences), the recipe and the exact command, the compute (steps,
images, wall time, hardware), the commit, and the benchmark table of BENCH_DIR (benchmark.md of
`emfm probe checkpoints=[random,zoo:NAME] benchmark=em`, test sections) when given, and the
fine-tuning table of experiments/foundation/finetune.py's records when given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

DATA = """\
Pretraining data (configs/data/corpus.yaml; the test sections of every benchmark task and the main
job's held-out sections are not in it):

| volume | modality, tissue | pixel size | sections used | licence / terms |
|---|---|---|---|---|
| ISBI 2012 training volume | ssTEM, Drosophila larva VNC | 4 x 4 x 50 nm | 0-19 of 30 | ISBI 2012\
 challenge terms (research, citation: Cardona et al. 2010, Arganda-Carreras et al. 2015); via\
 github.com/zhixuhao/unet (MIT) |
| ISBI 2012 challenge test volume (unlabelled) | ssTEM, same | 4 x 4 x 50 nm | all 30 | as above |
| CDeep3M SBEM mitochondria sample | SBEM, neuropil | 5.9 x 5.9 x 40 nm | 0-13 of 20 | UC Regents\
 licence: research / non-profit use (Haberl et al. 2018) |
| gala example training volume | FIB-SEM, fly neuropil | about 10 nm | all 50 (the test volume is\
 left out) | HHMI BSD-style (Nunez-Iglesias et al. 2013) |
| HeLa SBF-SEM (EMPIAR-10094 sections) | SBF-SEM, human HeLa cell | 10 x 10 x 50 nm | {hela} |\
 research use with citation (Karabag et al. 2019) |
| rat spinal-cord SEM (AxonDeepSeg) | SEM, rat white matter | 70-180 nm | all 10 images | MIT\
 (Zaimi et al. 2018) |

Each EM volume is sampled at its native pixel size and 2x coarser (OME-Zarr level 1), so patches\
 span
about 4-20 nm pixels; the rat SEM at native size only, with a small weight. The weights are per
tissue (configs/data/corpus.yaml). The checkpoint inherits the most restrictive of these terms:
research and non-commercial use, with the citations above.
"""


def _git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        return "unknown"


def _hela_sections(sources: list[dict]) -> str:
    """Which HeLa sections the run read ("all 24", or e.g. "0-1 of 24" where a run was given a
    subset, as on a lent GPU machine whose transfer limit left out the rest)."""
    for s in sources or []:
        if "hela" in str(s.get("path", "")) and s.get("source_sections"):
            a, b = s["source_sections"]
            return f"{a}-{b - 1} of 24 (a subset; see the compute section)"
    return "all 24"


def _portable(text: str) -> str:
    """The resolved config without absolute paths of the machine a run ran on: a source file
    under any folder `.../em/...` or `.../em_unlabelled/...` is written under ../shared/data."""
    import re

    return re.sub(r"(source: )/\S*?/(em(?:_unlabelled)?/)", r"\1../shared/data/\2", text)


def card(
    run: Path,
    name: str,
    bench: Path | None,
    finetune: Path | None = None,
    finetune_recipes: tuple[str, ...] = ("lr3e-3", "lr3e-3_sp28"),
    finetune_note: str = "",
    *,
    hardware: str = "",
    command: str = "",
    bench_command: str = "",
    bench_name: str = "",
) -> tuple[str, dict]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    prov = (
        json.loads((run / "provenance.json").read_text())
        if (run / "provenance.json").exists()
        else {}
    )
    m, o, d, t = cfg["model"], cfg["objective"], cfg["data"], cfg["trainer"]
    steps = recs[-1]["step"] if recs else 0
    images = steps * d["batch_size"]
    # training time: each logged interval's crops over its throughput (a resumed run's pauses
    # excluded; a step logged twice after a resume counts once)
    by_step = {r["step"]: r for r in recs if "images_per_s" in r}
    span, prev = 0.0, 0
    for s in sorted(by_step):
        span += (s - prev) * d["batch_size"] / max(by_step[s]["images_per_s"], 1e-9)
        prev = s
    argv = prov.get("argv") or []
    custom_command = bool(command)
    command = command or (
        " ".join(["emfm " + argv[0].split()[-1]] + argv[1:]) if argv else "(not recorded)"
    )
    hardware = hardware or (
        "a 2-core CPU shared with other jobs (no accelerator)"
        if not any("cuda" in str(x) or "tpu" in str(x) for x in prov.get("devices", []))
        else f"accelerator {', '.join(prov['devices'])}"
    )
    arch = (
        f"2D U-Net, {len(m.get('widths') or []) or m['depth']} levels of "
        f"{m['width']}-{m['width'] * 2 ** ((m['depth'] or 4) - 1)} channels"
        if m["name"] == "unet"
        else f"ViT width {m['width']}, depth {m['depth']}, patches {m['patch_size']}"
    )
    lines = [
        f"# {name}",
        "",
        f"A self-supervised encoder for cellular EM from emfm: {arch}, "
        f"objective `{o['name']}`, {steps} steps x {d['batch_size']} crops of "
        f"{d['patch_shape'][1]} x "
        f"{d['patch_shape'][2]} pixels ({images} crops). Use it as `checkpoint=zoo:{name}` "
        f"(probe, export, finetune) or `checkpoints=[random,zoo:{name}]` (probing benchmark).",
        "",
        "## Recipe",
        "",
        f"- model: `{json.dumps({k: v for k, v in m.items() if v is not None})}`",
        f"- objective: `{json.dumps(o)}`",
        f"- optimiser: AdamW, peak lr {cfg['optim']['lr']}, warm-up {cfg['optim']['warmup_steps']} "
        "steps, cosine "
        f"decay, weight decay {cfg['optim']['weight_decay']}; seed {t['seed']}",
        f"- data: `data=corpus`, crops {d['patch_shape']}, batch {d['batch_size']}, loader "
        "augmentation "
        f"{d['aug']['ops']}",
        "",
        "## Command",
        "",
        "```bash",
        command,
        "```",
        "",
        "(from the repository root; "
        + ("" if custom_command else "`bash experiments/foundation/long_run.sh` runs it; ")
        + "the resolved config is `config.yaml` beside this card)",
        "",
        "## Compute",
        "",
        f"{steps} steps, {images} crops, {span / 3600:.2f} h of training time (logged throughput; "
        f"pauses of a resumed run excluded) on {hardware}; final loss {recs[-1]['loss']:.4f}."
        if recs
        else "",
        "",
        f"Trained from commit {prov.get('git_revision', 'unknown')[:10]}; published at commit "
        f"{_git_rev()}.",
        "",
        "## Data",
        "",
        DATA.format(hela=_hela_sections(d.get("sources"))),
    ]
    if bench is not None and (bench / "benchmark.md").exists():
        from targets import table  # experiments/foundation/targets.py

        lines += [
            "## Benchmark (test sections)",
            "",
            bench_command
            or (
                "Command: `bash experiments/foundation/benchmark_test.sh "
                f"{name}` (= `emfm probe checkpoints=[random,zoo:{name}] benchmark=em "
                "benchmark.blocks_choices=[[],[0,1,2,3]]`; settings in "
                "experiments/foundation/README.md)"
            ),
            "",
            "### Primary metric against random init",
            "",
            table(bench, bench_name or f"zoo:{name}")[0],
            "",
            "### Every metric",
            "",
            (bench / "benchmark.md").read_text(),
        ]
    if finetune is not None:
        from finetune import table as finetune_table  # experiments/foundation/finetune.py

        lines += [
            "## Fine-tuning (test sections)",
            "",
            finetune_note or FINETUNE_NOTE,
            "",
            finetune_table(finetune, recipes=set(finetune_recipes)),
        ]
    recipe = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("recipe=")), None)
    extra = {
        "data": "configs/data/corpus.yaml",
        "recipe": recipe or cfg.get("recipe") or o["name"],
        "steps": steps,
        "images": images,
        "commit": _git_rev(),
    }
    return "\n".join(lines) + "\n", extra


# the fine-tuning section's text when --finetune-note is not given (the recipe of the first cards)
FINETUNE_NOTE = (
    "Fine-tuned with `regime=finetune_sp` (each parameter 0.2 x the checkpoint + 0.8 x "
    "a fresh initialisation, shrink and perturb; chosen on the validation sections of "
    "ISBI and CDeep3M, where a checkpoint started as is, `regime=finetune`, ended below "
    "random init after 400 steps). The same mix of two random networks "
    "(`random (lr3e-3_sp28)`) is the control: it shows how much of the gain is the "
    "smaller initial weights rather than pretraining. Command and protocol: "
    "experiments/foundation/README.md."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("name")
    ap.add_argument("--benchmark")
    ap.add_argument(
        "--finetune", help="fine-tuning records (experiments/foundation/finetune_results.jsonl)"
    )
    ap.add_argument(
        "--finetune-recipes",
        default="lr3e-3,lr3e-3_sp28",
        help="comma-separated fine-tuning recipes (finetune.py --tag) shown in the card's table",
    )
    ap.add_argument(
        "--finetune-note", default="", help="the text above the card's fine-tuning table"
    )
    ap.add_argument("--description", default="")
    ap.add_argument("--hardware", default="", help="what it was trained on (default: from the run)")
    ap.add_argument("--command", default="", help="the command that trained it (default: argv)")
    ap.add_argument("--bench-command", default="", help="the benchmark's command line, as text")
    ap.add_argument(
        "--bench-name",
        default="",
        help="the checkpoint's name in the benchmark when it was run on the run directory "
        "(default zoo:NAME)",
    )
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument(
        "--card-only", action="store_true", help="rewrite MODEL_CARD.md of an existing entry only"
    )
    a = ap.parse_args()
    from emfm import zoo
    from emfm.train.publish import publish

    run = Path(a.run_dir)
    text, extra = card(
        run,
        a.name,
        Path(a.benchmark) if a.benchmark else None,
        Path(a.finetune) if a.finetune else None,
        tuple(a.finetune_recipes.split(",")),
        a.finetune_note,
        hardware=a.hardware,
        command=a.command,
        bench_command=a.bench_command,
        bench_name=a.bench_name,
    )
    if a.card_only:
        d = Path(zoo.path_of(a.name))
        (d / "MODEL_CARD.md").write_text(text)
        print(f"wrote {d / 'MODEL_CARD.md'}")
        return
    desc = a.description or "self-supervised EM encoder (emfm)"
    d = publish(run, a.name, description=desc, card=text, extra=extra, overwrite=a.overwrite)
    # the resolved config, with the run directory as given (no absolute path of the machine it ran
    # on)
    cfg_text = _portable(
        "\n".join(
            f"run_dir: {a.run_dir}" if ln.startswith("run_dir:") else ln
            for ln in (run / "config.yaml").read_text().splitlines()
        )
        + "\n"
    )
    (d / "config.yaml").write_text(cfg_text)
    print(f"published {d} ({json.loads((d / 'entry.json').read_text())['size_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
