"""How the CLI reports failures: the user's input in one line (exit 2), a bug with its traceback
(exit 1), a preemption with 128 + the signal; and progress bars that stay quiet in log files."""

from __future__ import annotations

import signal

import pytest
from omegaconf import OmegaConf

from emfm.cli import apps
from emfm.config.schema import ConfigError
from emfm.errors import UserError
from emfm.train.loop import Preempted, Preemption


def _fail_with(monkeypatch, exc):
    def boom(cfg, cmd):
        raise exc

    monkeypatch.setattr(apps, "to_config", boom)
    monkeypatch.delenv("EMFM_DEBUG", raising=False)
    return apps._task("pretrain", [], [])


def test_user_error_is_one_line(monkeypatch, capsys):
    task = _fail_with(monkeypatch, ConfigError("data.path='x.zarr': no such volume"))
    with pytest.raises(SystemExit) as e:
        task(OmegaConf.create({}))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == "emfm: error: data.path='x.zarr': no such volume"
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)


def test_internal_error_shows_its_traceback(monkeypatch, capsys):
    # a ValueError that emfm did not raise about the input (e.g. from numpy deep inside) is a bug
    task = _fail_with(monkeypatch, ValueError("operands could not be broadcast together"))
    with pytest.raises(SystemExit) as e:
        task(OmegaConf.create({}))
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert "Traceback (most recent call last)" in err and "in boom" in err
    assert "internal error (ValueError): this is a bug in emfm" in err


def test_preemption_exit_status_and_the_scheduler_hook(monkeypatch, capsys):
    task = _fail_with(monkeypatch, Preempted("SIGUSR2: saved", signal.SIGUSR2))
    with pytest.raises(SystemExit) as e:
        task(OmegaConf.create({}))
    assert e.value.code == 128 + signal.SIGUSR2
    # the handler installed before (a scheduler's, e.g. submitit's requeue) runs after the
    # checkpoint
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(("scheduler", s)))
    try:
        p = Preemption(["SIGUSR1", "SIGUSR2"])
        assert p.agreed() is None
        signal.raise_signal(signal.SIGUSR1)
        assert p.agreed() == signal.SIGUSR1 and seen == []
        p.hand_over(signal.SIGUSR1)
        assert seen == [("scheduler", signal.SIGUSR1)]
        p.restore()
        signal.raise_signal(signal.SIGUSR1)
        assert len(seen) == 2
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_unknown_signal_names_the_key():
    from conftest import compose

    with pytest.raises(ConfigError, match="trainer.preempt_signals: 'SIGNOPE'"):
        compose("pretrain", ["trainer.preempt_signals=[SIGUSR2,SIGNOPE]"])
    assert compose("pretrain", []).trainer.preempt_signals == ["SIGUSR1", "SIGUSR2", "SIGTERM"]


def test_progress_is_rate_limited_without_a_terminal(monkeypatch):
    from emfm.train.logging import progress

    monkeypatch.delenv("EMFM_PROGRESS_INTERVAL", raising=False)
    import io

    out = io.StringIO()  # not a terminal
    bar = progress(1000, desc="x", file=out)
    assert bar.mininterval == 30.0
    for _ in range(1000):  # the training loop's pattern: postfix at every log step, then update
        bar.set_postfix(refresh=False, loss="1.0")
        bar.update(1)
    bar.close()
    assert out.getvalue().count("\r") <= 3, (
        out.getvalue()
    )  # the first draw and the final one, no more


def test_slurm_auto_start_only_in_a_step_of_several_tasks(monkeypatch):
    from emfm.train.distributed import slurm_step_tasks

    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    assert slurm_step_tasks() == 1  # not in Slurm
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    # an allocation of 4 tasks, this process started by hand
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert slurm_step_tasks() == 1
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun: a step of 4 tasks
    assert slurm_step_tasks() == 4


def test_a_coordinator_that_never_answers_is_a_clear_error(tmp_path):
    import socket

    from conftest import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_cli(
        "pretrain",
        "debug=tiny",
        "distributed.enabled=true",
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
        "distributed.process_id=1",
        "distributed.timeout_s=2",
        f"hydra.run.dir={tmp_path / 'r'}",
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        f"the coordinator 127.0.0.1:{port} did not answer within distributed.timeout_s=2"
        in res.stderr
    )


def test_config_errors_exit_2_naming_the_key(tmp_path):
    from conftest import run_cli

    run = f"hydra.run.dir={tmp_path / 'r'}"
    cases = {
        "+trainer.stepz=2": "unknown config key trainer.stepz",  # Hydra lets `+` through
        "+bogus=1": "unknown config key bogus",
        "model=unet3": "Could not find 'model/unet3'",  # Hydra's composition error
        "trainer.steps=abc": "trainer.steps",
        "name=a/b": "a run name is one directory name",
        "trainer.keep_checkpoints=0": "keep_checkpoints >= 1",
        "trainer.log_every=0": "log_every >= 1",
        "data.intensity_samples=0": "data.intensity_samples=0",
    }
    for arg, msg in cases.items():
        res = run_cli("pretrain", "debug=tiny", arg, run, cwd=tmp_path)
        assert res.returncode == 2 and msg in res.stderr + res.stdout, (arg, res.stderr[-1500:])
    assert not (tmp_path / "r" / "checkpoints").exists()
    # a dict-valued setting takes new keys by design
    cfg = OmegaConf.create({"tune_grid": {"threshold": [0.2]}})
    assert apps.unknown_keys(cfg) == []


def test_ctrl_c_is_a_short_message_not_a_traceback(monkeypatch, capsys):
    task = _fail_with(monkeypatch, KeyboardInterrupt())
    with pytest.raises(SystemExit) as e:
        task(OmegaConf.create({}))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted (Ctrl-C)" in err and "Traceback" not in err
