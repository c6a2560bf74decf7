"""Local sweeps (Hydra multirun), the runs summary, and the Slurm launcher config up to its sbatch
script."""

import csv
import json

from conftest import CONFIGS, run_cli


def test_multirun_sweep_then_summarize(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli(
        "pretrain",
        "-m",
        "debug=tiny",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "objective.mask_ratio=0.5,1.5,0.75",  # the middle job's setting is invalid
        f"hydra.sweep.dir={sweep}",
    )
    # the invalid job stops with its error, the sweep goes on, and its exit status says so
    assert res.returncode == 2 and "mask_ratio=1.5: must be in (0, 1)" in res.stderr, res.stderr
    assert "1 job(s) of the sweep stopped" in res.stderr
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "config.yaml").exists())
    assert len(runs) == 3
    status = [json.loads((r / "status.json").read_text())["status"] for r in runs]
    assert status == ["finished", "failed", "finished"]
    # a third run that "died": status running, files old
    dead = sweep / "dead"
    dead.mkdir()
    (dead / "config.yaml").write_text(
        (runs[0] / "config.yaml").read_text().replace("mask_ratio: 0.5", "mask_ratio: 0.9")
    )
    (dead / "status.json").write_text(json.dumps({"status": "running"}))
    res = run_cli("runs", "summarize", str(sweep), "--stale-after", "0")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 4
    assert "objective.mask_ratio" in rows[0]  # the swept key is a column; constant keys are not
    assert "model.width" not in rows[0]
    by_ratio = {r["objective.mask_ratio"]: r for r in rows}
    assert by_ratio["0.5"]["status"] == "finished" and by_ratio["0.9"]["status"] == "stalled"
    assert by_ratio["1.5"]["status"] == "failed"
    assert int(by_ratio["0.75"]["steps"]) == 4 and float(by_ratio["0.75"]["final_loss"]) > 0
    assert (sweep / "loss_curves.png").stat().st_size > 1000
    res = run_cli("runs", "summarize", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "not found" in res.stderr


def test_slurm_launcher_composes_and_writes_sbatch(tmp_path):
    from hydra import compose, initialize_config_dir
    from submitit.slurm.slurm import _make_sbatch_string

    from emfm.config import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None, job_name="pretrain"):
        cfg = compose(
            "pretrain",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.tasks_per_node=4",
                "hydra.launcher.nodes=2",
            ],
            return_hydra_config=True,
        )
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher")
    text = _make_sbatch_string(
        command="emfm pretrain model=vit_b16",
        folder=tmp_path,
        job_name="pretrain",
        partition=la.partition,
        time=la.timeout_min,
        nodes=la.nodes,
        ntasks_per_node=la.tasks_per_node,
        gpus_per_node=la.gpus_per_node,
        cpus_per_task=la.cpus_per_task,
        mem=f"{la.mem_gb}GB",
        signal_delay_s=la.signal_delay_s,
    )
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=1440",
    ]:
        assert line in text, line
    assert "emfm pretrain model=vit_b16" in text
