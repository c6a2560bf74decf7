"""The step loop shared by `emfm pretrain` and `emfm finetune`.

A run supplies its compiled pure step, its state and its batch iterator; the loop does the rest the
same way for both: a preemption signal (`trainer.preempt_signals`, default SIGUSR1, SIGUSR2 and
SIGTERM) -> every process agrees on the same stop step, one checkpoint of it, the scheduler's own
handler (e.g. submitit's requeue) and `Preempted`; metrics every
`log_every` steps (JSONL + TensorBoard, with the learning rate, throughput and the share of wall
time spent waiting for data); a non-finite loss stops the run naming the step (or is skipped);
best and periodic checkpoints with the data position; a progress bar; the final checkpoint; and
`status.json` (running / preempted / finished / failed) whatever happens.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from emfm.train import checkpoint
from emfm.train import mesh as meshlib
from emfm.train.logging import MetricWriter, progress


class NonFiniteLoss(FloatingPointError):
    pass


class Preempted(RuntimeError):
    """A preemption signal arrived; a checkpoint of the current step was written before leaving.
    `exit_code` is 128 + the signal number (143 for SIGTERM), what a shell reports for a job ended
    by that signal."""

    def __init__(self, msg: str, signum: int = signal.SIGTERM):
        super().__init__(msg)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class Preemption:
    """Catches the configured signals while the loop runs; `agreed(step)` is called by every process
    at every step, so all processes see the same answer at the same step: one process that got the
    signal is enough to stop them all at one step, with no process left waiting in a collective the
    others never enter. With several processes the flags are all-gathered every `every` steps (the
    log interval), not at every step, to keep the host synchronisation off the hot path."""

    def __init__(self, names: list[str], enabled: bool = True, every: int = 1):
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.every = max(1, int(every))
        if not enabled:
            return
        for n in names:
            signum = getattr(signal, n)
            try:
                self.previous[signum] = signal.signal(signum, self._catch)
            except ValueError:  # not the main thread (e.g. inside a notebook kernel thread)
                pass

    def _catch(self, signum, frame) -> None:
        if self.received is None:
            self.received = int(signum)
            logging.getLogger("emfm").warning(
                "received %s: checkpointing at the next step", signal.Signals(signum).name
            )

    def agreed(self, step: int = 0) -> int | None:
        """The signal to stop for (the lowest number any process received), or None."""
        if jax.process_count() == 1:
            return self.received
        if step % self.every:
            return None
        import numpy as np
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.int32(self.received or 0)))
        got = flags[flags > 0]
        return int(got.min()) if got.size else None

    def hand_over(self, signum: int) -> None:
        """Call what was installed before for `signum` (a scheduler's handler, e.g. submitit's
        checkpoint-and-requeue, which may exit); a process that did not get the signal itself
        calls it too, so each process's scheduler hook runs once."""
        prev = self.previous.get(signum)
        if callable(prev):
            prev(signum, None)

    def restore(self) -> None:
        for signum, prev in self.previous.items():
            signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
        self.previous = {}


def write_status(run_dir: Path, status: str, **extra) -> None:
    if jax.process_index() == 0:
        (run_dir / "status.json").write_text(
            json.dumps({"status": status, "time": time.time(), **extra})
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the restored step (written by a run that died before its next
    checkpoint)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def restore_or_init(mngr, abstract, init: Callable[[], Any], run_dir: Path) -> tuple[Any, int]:
    """(state, first step): the run's latest checkpoint restored into `abstract` (sharded shapes),
    dropping metric records written after it, or `init()` at step 0 when there is none."""
    if mngr.latest_step() is None:
        return init(), 0
    state, _ = checkpoint.restore(mngr, abstract)
    start = int(state.step)
    logging.getLogger("emfm").info("resumed from %s at step %d", mngr.directory, start)
    if jax.process_index() == 0:
        truncate_metrics(run_dir / "metrics.jsonl", start)
    return state, start


@dataclass
class LoopResult:
    state: Any
    losses: list[float] = field(default_factory=list)  # the loss at each logged step
    loop_s: float = 0.0  # wall time of the steps run here
    images: int = 0  # examples consumed
    wait_s: float = 0.0  # of loop_s, time spent blocked on the data iterator


def run(
    step_fn: Callable,
    state,
    data: Iterator[dict],
    *,
    start: int,
    steps: int,
    mesh,
    mngr,
    meta: dict,
    run_dir: Path,
    trainer,
    sched: Callable,
    accumulate_steps: int = 1,
    batch_size: int,
    desc: str,
    best=None,
    main_proc: bool = True,
    catch_signals: bool = True,
    log_first: bool = False,
    throughput: bool = True,
) -> LoopResult:
    """Run `state = step_fn(state, batch)` for steps `start .. steps - 1` on batches
    `meshlib.global_batch(next(data))`; `data` also has `state()` (saved with every checkpoint),
    `close()` and, for the data-wait fraction, `wait_s` (seconds its consumer spent blocked).

    `trainer` is the run's TrainerConfig (log_every, checkpoint_every, nonfinite, best_metric,
    tensorboard, progress); `best` an optional checkpoint manager for the best `best_metric`.
    `log_first` also logs the first step run; `throughput` adds images/s, skipped batches and the
    data-wait fraction to the logged metrics. Closes `data`, `mngr` and `best` on the way out.
    """
    preemption = Preemption(
        list(trainer.preempt_signals), enabled=catch_signals, every=trainer.log_every
    )
    stopped_by: dict = {}
    writer = MetricWriter(run_dir, tensorboard=trainer.tensorboard) if main_proc else None
    write_status(run_dir, "running", step=start)
    out = LoopResult(state)
    bar = progress(steps, initial=start, desc=desc, enabled=trainer.progress and main_proc)
    wait = lambda: getattr(data, "wait_s", 0.0)  # noqa: E731
    t_loop = time.perf_counter()
    wait0 = wait()
    window = [t_loop, wait0]  # start of the current logging window: time, data wait so far
    best_value = math.inf
    status = "failed"
    save = lambda mgr, step, extra=None, **kw: checkpoint.save(  # noqa: E731
        mgr, step, out.state, {**meta, "data": data.state(), **(extra or {})}, **kw
    )
    try:
        for step in range(start, steps):
            signum = preemption.agreed(step)
            if signum is not None:
                save(mngr, step, force=True)
                mngr.wait_until_finished()
                status = "preempted"
                stopped_by["signal"] = signal.Signals(signum).name
                preemption.hand_over(signum)
                raise Preempted(
                    f"{signal.Signals(signum).name}: saved a checkpoint at step {step} in "
                    f"{mngr.directory}; run the same command to resume",
                    signum,
                )
            batch = meshlib.global_batch(next(data), mesh)
            out.state, metrics = step_fn(out.state, batch)
            out.images += batch_size
            last = step + 1 == steps
            if (step + 1) % trainer.log_every == 0 or last or (log_first and step == start):
                m = jax.device_get(metrics)
                bad, first_bad = int(out.state.nonfinite), int(out.state.first_bad)
                if bad and trainer.nonfinite == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss or gradient at step {first_bad}; its update was not "
                        f"applied and the last good checkpoint in {mngr.directory} is kept "
                        "(trainer.nonfinite=skip skips such batches instead)"
                    )
                loss = float(m["loss"])
                out.losses.append(loss)
                m.update(lr=sched(step // accumulate_steps))
                postfix = {"loss": f"{loss:.4f}"}
                if throughput:
                    now = time.perf_counter()
                    rate = out.images / (now - t_loop)
                    # share of this logging window's wall time the loop spent blocked on the data
                    wait_frac = (wait() - window[1]) / max(now - window[0], 1e-9)
                    window[:] = [now, wait()]
                    m.update(images_per_s=rate, skipped_batches=bad, data_wait_fraction=wait_frac)
                    postfix["img_s"] = f"{rate:.1f}"
                if writer is not None:
                    writer.write(step + 1, m)
                # drawn with the next update, rate-limited
                bar.set_postfix(refresh=False, **postfix)
                if best is not None and trainer.best_metric in m:
                    v = float(m[trainer.best_metric])
                    if v < best_value:
                        best_value = v
                        save(
                            best,
                            step + 1,
                            {"best": v},
                            metrics={trainer.best_metric: v},
                            force=True,
                        )
            bar.update(1)
            if trainer.checkpoint_every and (step + 1) % trainer.checkpoint_every == 0 and not last:
                save(mngr, step + 1)
        if start < steps:
            jax.block_until_ready(out.state)
        out.loop_s = time.perf_counter() - t_loop
        out.wait_s = wait() - wait0
        save(mngr, steps, force=True)
        mngr.wait_until_finished()
        status = "finished"
    finally:
        bar.close()
        data.close()
        if writer is not None:
            writer.close()
        mngr.close()
        if best is not None:
            best.close()
        preemption.restore()
        write_status(
            run_dir,
            status,
            step=int(jax.device_get(out.state.step)) if status != "failed" else None,
            **stopped_by,
        )
    return out
