"""Training engine: exact resume after SIGKILL, preemption signals (one or two processes), named
runs, two processes equal one,
non-finite handling, FSDP equals data parallel. Tiny model, real bundled EM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli

TINY = ["debug=tiny", "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=1"]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def popen(*args):
    exe = Path(sys.executable).parent / "emfm"
    return subprocess.Popen(
        [str(exe), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def wait_for_step(run_dir: Path, step: int, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir) or {0: 0}) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError("run ended early: " + proc.stderr.read()[-2000:])
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path):
    args = TINY + ["trainer.steps=40", "trainer.checkpoint_every=10"]
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_cli("pretrain", *args, f"hydra.run.dir={a}")
    assert res.returncode == 0, res.stderr[-2000:]
    p = popen("pretrain", *args, f"hydra.run.dir={b}")
    wait_for_step(b, 25, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((b / "status.json").read_text())["status"] == "running"  # died without a word
    res = run_cli("pretrain", *args, f"hydra.run.dir={b}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stderr + res.stdout
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 41))
    np.testing.assert_allclose(
        [lb[s] for s in range(1, 41)], [la[s] for s in range(1, 41)], rtol=0, atol=1e-6
    )
    assert json.loads((b / "status.json").read_text())["status"] == "finished"


def test_best_checkpoint_and_logs(tmp_path):
    run = tmp_path / "best"
    res = run_cli(
        "pretrain",
        "debug=tiny",
        "trainer.progress=false",
        "trainer.log_every=1",
        "trainer.steps=6",
        "trainer.best_metric=loss",
        f"hydra.run.dir={run}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    best_steps = [int(d.name) for d in (run / "checkpoints_best").iterdir() if d.name.isdigit()]
    la = losses(run)
    assert best_steps == [min(la, key=la.get)]  # the one kept is the lowest-loss step
    assert list((run / "tb").glob("events.out.tfevents.*"))  # TensorBoard events
    log = (run / "pretrain.log").read_text()
    assert (
        "M parameters" in log and "compiled in" in log and "temp" in log
    )  # size and compiled memory
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["packages"]["jax"] and "git_revision" in prov


def _signal_mid_run(cmd: str, args: list, run: Path, sig: int, at_step: int = 6):
    p = popen(cmd, *args, f"hydra.run.dir={run}")
    wait_for_step(run, at_step, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=180)
    return p.returncode, err


@pytest.mark.parametrize("cmd", ["pretrain", "finetune"])
def test_launcher_signal_checkpoints_and_the_rerun_equals_an_uninterrupted_run(tmp_path, cmd):
    """The Slurm launcher's USR2: checkpoint of the current step, exit status 128 + signal, and
    rerunning the same command ends with the same losses as a run never interrupted."""
    sig = signal.SIGUSR2
    args = (
        TINY + ["trainer.steps=120"]
        if cmd == "pretrain"
        else [
            "debug=seg_tiny",
            "trainer.steps=120",
            "trainer.log_every=1",
            "trainer.progress=false",
            "trainer.tensorboard=false",
            "data.patch_shape=[1,32,32]",
            "model.depth=1",
            "model.patch_size=[4,4]",
            "data.test_roi=null",
        ]
    )
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_cli(cmd, *args, f"hydra.run.dir={a}")
    assert res.returncode == 0, res.stderr[-2000:]
    code, err = _signal_mid_run(cmd, args, b, sig)
    assert code == 128 + sig, err[-2000:]
    status = json.loads((b / "status.json").read_text())
    assert status["status"] == "preempted" and status["signal"] == signal.Signals(sig).name
    saved = sorted(int(d.name) for d in (b / "checkpoints").iterdir() if d.name.isdigit())
    assert saved and 6 <= saved[-1] < 120 and f"saved a checkpoint at step {saved[-1]}" in err
    res = run_cli(cmd, *args, f"hydra.run.dir={b}")
    assert res.returncode == 0 and "resumed from" in res.stderr + res.stdout, res.stderr[-2000:]
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) and max(la) == 120
    np.testing.assert_allclose(
        [lb[s] for s in sorted(la)], [la[s] for s in sorted(la)], rtol=0, atol=1e-6
    )


def two_processes(cmd: str, *args: str) -> list:
    """`emfm CMD ARGS` as processes 0 and 1 of one jax.distributed run on this machine."""
    port = _free_port()
    return [
        popen(
            cmd,
            *args,
            "distributed.enabled=true",
            f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2",
            f"distributed.process_id={i}",
        )
        for i in range(2)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_named_run_resumes_and_resume_false_starts_afresh(tmp_path):
    """`name=NAME` -> runs/<command>/NAME, resumed by the same command; resume=false leaves it as it
    is."""
    res = run_cli("pretrain", *TINY, "trainer.steps=2", "name=n1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "pretrain" / "n1"
    assert (run / "checkpoints" / "2").is_dir()
    res = run_cli("pretrain", *TINY, "trainer.steps=4", "name=n1", cwd=tmp_path)
    assert res.returncode == 0 and "resumed from" in res.stderr + res.stdout, res.stderr[-2000:]
    assert sorted(losses(run)) == [1, 2, 3, 4]
    # the finished run run again: nothing to train, its status and summary kept
    summary = (run / "pretrain_summary.json").read_text()
    res = run_cli("pretrain", *TINY, "trainer.steps=4", "name=n1", cwd=tmp_path)
    assert res.returncode == 0 and "nothing to train" in res.stderr + res.stdout, res.stderr[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 4
    assert (run / "pretrain_summary.json").read_text() == summary
    # another model in the same run directory: refused before its config.yaml is touched
    config = (run / "config.yaml").read_text()
    res = run_cli("pretrain", *TINY, "trainer.steps=6", "name=n1", "model.width=64", cwd=tmp_path)
    assert res.returncode == 2 and "model.width=32 there, 64 here" in res.stderr, res.stderr[-2000:]
    assert (run / "config.yaml").read_text() == config
    res = run_cli("pretrain", *TINY, "trainer.steps=2", "name=n1", "resume=false", cwd=tmp_path)
    assert res.returncode == 0 and "resumed from" not in res.stderr + res.stdout, res.stderr[-2000:]
    fresh = [d for d in (tmp_path / "runs" / "pretrain").iterdir() if d.name.startswith("n1_")]
    assert (
        len(fresh) == 1
        and (fresh[0] / "checkpoints" / "2").is_dir()
        and sorted(losses(run)) == [1, 2, 3, 4]
    )
    res = run_cli("pretrain", *TINY, "resume=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert (
        res.returncode == 2
        and "resume=false but" in res.stderr
        and "holds checkpoints" in res.stderr
    )


def test_two_processes_equal_one_process(tmp_path):
    args = TINY + ["trainer.steps=4", "data.batch_size=8"]
    one = tmp_path / "one"
    res = run_cli("pretrain", *args, f"hydra.run.dir={one}")
    assert res.returncode == 0, res.stderr[-2000:]
    two = tmp_path / "two"
    procs = two_processes("pretrain", *args, f"hydra.run.dir={two}")
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    summary = json.loads((two / "pretrain_summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    l1, l2 = losses(one), losses(two)
    np.testing.assert_allclose(
        [l2[s] for s in range(1, 5)], [l1[s] for s in range(1, 5)], rtol=0, atol=1e-5
    )


def test_finetune_on_two_processes_equals_one_process(tmp_path):
    args = [
        "debug=seg_tiny",
        "trainer.steps=4",
        "trainer.log_every=1",
        "trainer.progress=false",
        "data.batch_size=4",
        "data.patch_shape=[1,32,32]",
        "model.depth=1",
        "model.patch_size=[4,4]",
        "data.test_roi=null",
    ]
    one = tmp_path / "one"
    res = run_cli("finetune", *args, f"hydra.run.dir={one}")
    assert res.returncode == 0, res.stderr[-2000:]
    two = tmp_path / "two"
    procs = two_processes("finetune", *args, f"hydra.run.dir={two}")
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "process 1 of 2" in outs[1][1] or "process 1 of 2" in (two / "finetune.log").read_text()
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [l2[s] for s in range(1, 5)], [l1[s] for s in range(1, 5)], rtol=0, atol=1e-5
    )


def test_predict_and_instances_on_two_processes_equal_one_process(tmp_path):
    """Two processes split the prediction chunks and the instance blocks (process 0 stitches): the
    same probabilities and the same instance labels as one process."""
    from emfm.data.volume import open_volume

    ft = tmp_path / "ft"
    res = run_cli(
        "finetune",
        "debug=seg_tiny",
        "trainer.steps=2",
        "trainer.progress=false",
        "data.test_roi=null",
        "data.patch_shape=[1,32,32]",
        "model.depth=1",
        "model.patch_size=[4,4]",
        f"hydra.run.dir={ft}",
    )
    assert res.returncode == 0, res.stderr[-2000:]

    def args(tag):
        return [
            f"checkpoint={ft}",
            "predict.roi=[[20,22],[0,128],[0,128]]",
            "predict.window=[1,32,32]",
            "predict.overlap=[0,8,8]",
            "predict.chunk=[1,64,64]",
            f"predict.out={tmp_path / tag}.zarr",
            "predict.instances=watershed",
            "instances.block=[1,64,64]",
            "instances.halo=[0,16,16]",
            "instances.min_seed=4",
            "trainer.progress=false",
            f"hydra.run.dir={tmp_path / ('run_' + tag)}",
        ]

    res = run_cli("predict", *args("one"))
    assert res.returncode == 0, res.stderr[-2000:]
    procs = two_processes("predict", *args("two"))
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    np.testing.assert_array_equal(
        open_volume(tmp_path / "two.zarr").read(), open_volume(tmp_path / "one.zarr").read()
    )
    one, two = (open_volume(tmp_path / f"{t}_instances.zarr").read() for t in ("one", "two"))
    assert one.max() >= 2
    np.testing.assert_array_equal(two, one)


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Only process 1 gets the launcher's signal; both agree on the stop step, write one checkpoint
    of it together and exit with the requeue status, without waiting on each other forever."""
    args = TINY + ["trainer.steps=400", "data.batch_size=8"]
    run = tmp_path / "two"
    procs = two_processes("pretrain", *args, f"hydra.run.dir={run}")
    wait_for_step(run, 4, procs[0])
    procs[1].send_signal(signal.SIGUSR2)
    outs = [p.communicate(timeout=180) for p in procs]
    steps = []
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 128 + signal.SIGUSR2, err[-3000:]
        steps.append(int(err.split("saved a checkpoint at step ")[1].split()[0]))
    assert steps[0] == steps[1] and 4 <= steps[0] < 400
    saved = sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
    assert saved[-1] == steps[0]
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"


def test_fsdp_on_8_cpu_devices_equals_data_parallel(tmp_path):
    args = TINY + [
        "trainer.steps=3",
        "data.batch_size=8",
        "distributed.cpu_devices=8",
        "mesh.min_shard_size=64",
    ]
    dp, fs = tmp_path / "dp", tmp_path / "fsdp"
    r1 = run_cli("pretrain", *args, f"hydra.run.dir={dp}")
    r2 = run_cli("pretrain", *args, "mesh.fsdp=4", f"hydra.run.dir={fs}")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-1500:] + r2.stderr[-1500:]
    summary = json.loads((fs / "pretrain_summary.json").read_text())
    assert summary["devices"] == 8
    assert summary["host"]["backend"] == "cpu" and summary["host"]["cpu_count"] == os.cpu_count()
    l1, l2 = losses(dp), losses(fs)
    np.testing.assert_allclose(
        [l2[s] for s in (1, 2, 3)], [l1[s] for s in (1, 2, 3)], rtol=0, atol=1e-5
    )


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tmp_path):
    # a learning rate this large overflows within a few steps
    bad = TINY + [
        "trainer.steps=30",
        "optim.lr=1e30",
        "optim.clip_norm=null",
        "optim.warmup_steps=0",
    ]
    res = run_cli("pretrain", *bad, f"hydra.run.dir={tmp_path / 's'}")
    assert res.returncode == 2 and "non-finite loss or gradient at step" in res.stderr
    assert not (tmp_path / "s" / "checkpoints").exists() or not any(
        (tmp_path / "s" / "checkpoints").glob("30")
    )
    res = run_cli("pretrain", *bad, "trainer.nonfinite=skip", f"hydra.run.dir={tmp_path / 'k'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "k" / "pretrain_summary.json").read_text())["skipped_batches"] > 0
