"""The training engine shared by `emfm pretrain` and `emfm finetune`.

A run supplies its pure step, its state and its batch iterator (`start_job`, then `Engine`); the
engine does the rest the same way for both: the step jitted with the state sharded over the mesh;
the run's own checkpoint restored; the step compiled ahead of time, its memory logged; then the
steps, with a preemption signal (`trainer.preempt_signals`, default SIGUSR1, SIGUSR2 and SIGTERM) ->
every process agrees on the same stop step, one checkpoint of it, the scheduler's own handler (e.g.
submitit's requeue) and `Preempted`; metrics every `log_every` steps (JSONL + TensorBoard, with the
learning rate, throughput and the share of wall time spent waiting for data); a non-finite loss
stops the run naming the step (or is skipped); best and periodic checkpoints with the data
position; a progress bar; the final checkpoint; and `status.json` (running / preempted / finished /
failed) whatever happens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jaxlib

from emfm.errors import UserError
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

    def __init__(self, names: list[str], every: int = 1):
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.every = max(1, int(every))
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


def host_record() -> dict:
    """Where a run ran: CPU model and logical cores, backend and device kind, jax and jaxlib
    versions. XLA compiles for the host's instruction set, so the same command and seed can end
    elsewhere on another CPU; run summaries keep this record so that results can be told apart."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }


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


def kept_summary(path: Path, steps_run: int) -> dict | None:
    """The summary recorded at `path` when a run trained nothing this time (`steps_run` <= 0: a
    finished run run again), so that its record of the training is not overwritten; else None."""
    if steps_run > 0 or not path.exists():
        return None
    logging.getLogger("emfm").info("kept the run's summary %s", path)
    return json.loads(path.read_text())


def restore_or_init(mngr, abstract, init: Callable[[], Any], run_dir: Path) -> tuple[Any, int]:
    """(state, first step): the run's latest checkpoint restored into `abstract` (sharded shapes),
    dropping metric records written after it, or `init()` at step 0 when there is none."""
    if mngr.latest_step() is None:
        return init(), 0
    try:
        state, _ = checkpoint.restore(mngr, abstract)
    except ValueError as e:  # orbax: the stored tree or shapes are not those of this model
        from emfm.errors import UserError

        raise UserError(
            f"run directory {run_dir} holds checkpoints of another model or training state than "
            "the one configured, so it cannot be resumed with this config; run it with its own "
            f"config ({run_dir / 'config.yaml'}) or choose another run directory (name=NAME or "
            f"hydra.run.dir=DIR). ({str(e).splitlines()[0][:200]})"
        ) from e
    start = int(state.step)
    logging.getLogger("emfm").info("resumed from %s at step %d", mngr.directory, start)
    if jax.process_index() == 0:
        truncate_metrics(run_dir / "metrics.jsonl", start)
    return state, start


@dataclass
class Job:
    """Where a training run happens: its directory, the JAX processes, the device mesh, and the
    global batch it splits over them."""

    dir: Path
    mesh: Any
    batch_size: int  # global: over all processes
    process_index: int = 0
    process_count: int = 1
    started: float = field(default_factory=time.perf_counter)

    @property
    def main_proc(self) -> bool:
        return self.process_index == 0


def start_job(run_dir: str, batch_size: int, mesh_cfg) -> Job:
    """Make the run directory and the device mesh (`mesh_cfg`, a MeshConfig); the global batch
    must split evenly over the JAX processes and over the mesh's devices."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    pid, pcount = jax.process_index(), jax.process_count()
    if batch_size % pcount:
        raise UserError(
            f"data.batch_size={batch_size} (the global batch) is not divisible by {pcount} "
            "processes"
        )
    mesh = meshlib.make_mesh(mesh_cfg.data, mesh_cfg.fsdp)
    if batch_size % mesh.size:
        raise UserError(
            f"data.batch_size={batch_size} is not divisible by the {mesh.size} devices of the mesh"
        )
    return Job(d, mesh, batch_size, pid, pcount)


@dataclass
class LoopResult:
    state: Any
    start: int = 0  # the first step run here (the checkpoint resumed from, or 0)
    compile_s: float = 0.0
    losses: list[float] = field(default_factory=list)  # the loss at each logged step
    loop_s: float = 0.0  # wall time of the steps run here
    images: int = 0  # examples consumed
    wait_s: float = 0.0  # of loop_s, time spent blocked on the data iterator


class Engine:
    """The training engine shared by `emfm pretrain` and `emfm finetune`: `step_fn(state, batch)`
    (pure, from make_train_step) jitted once with the state sharded over the job's mesh
    (parameters of at least `min_shard_size` elements split along `fsdp`) and donated, the batch
    split along `data`; the run's checkpoint managers (`trainer`: a TrainerConfig)."""

    def __init__(
        self, job: Job, step_fn: Callable, abstract_state, *, trainer, min_shard_size: int
    ):
        self.job, self.trainer = job, trainer
        self.state_sh = meshlib.state_shardings(abstract_state, job.mesh, min_shard_size)
        self.batch_sh = meshlib.batch_sharding(job.mesh)
        self.step = jax.jit(
            step_fn,
            in_shardings=(self.state_sh, self.batch_sh),
            out_shardings=(self.state_sh, None),
            donate_argnums=0,
        )
        self.abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            self.state_sh,
        )
        interval = trainer.checkpoint_every or trainer.steps
        self.mngr = checkpoint.manager(job.dir, keep=trainer.keep_checkpoints, interval=interval)
        self.best = (
            checkpoint.best_manager(job.dir, trainer.best_metric) if trainer.best_metric else None
        )

    def restore_or_init(self, init: Callable[[Any], Any]) -> tuple[Any, int]:
        """(state, first step): the run's latest checkpoint, or `init(state shardings)` at 0."""
        return restore_or_init(self.mngr, self.abstract, lambda: init(self.state_sh), self.job.dir)

    def compile(self, example: dict) -> tuple[Any, float]:
        """The step compiled ahead of time for batches like `example` (this process's share of a
        global batch), and the seconds it took; its memory per device is logged."""
        pcount, sh = self.job.process_count, self.batch_sh
        batch = {
            k: jax.ShapeDtypeStruct((v.shape[0] * pcount, *v.shape[1:]), v.dtype, sharding=sh)
            for k, v in example.items()
        }
        t0 = time.perf_counter()
        compiled = self.step.lower(self.abstract, batch).compile()
        seconds = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if mem is not None:
            logging.getLogger("emfm").info(
                "compiled in %.1f s; per device: temp %.1f MB, arguments %.1f MB, outputs %.1f MB",
                seconds,
                getattr(mem, "temp_size_in_bytes", 0) / 2**20,
                getattr(mem, "argument_size_in_bytes", 0) / 2**20,
                getattr(mem, "output_size_in_bytes", 0) / 2**20,
            )
        return compiled, seconds

    def run(
        self,
        state,
        start: int,
        data,
        *,
        meta: dict,
        sched: Callable,
        accumulate_steps: int = 1,
        desc: str,
        log_first: bool = False,
        throughput: bool = True,
    ) -> LoopResult:
        """Compile the step for `data.example()`, then run `state = step(state, batch)` for steps
        `start .. trainer.steps - 1` on batches `meshlib.global_batch(next(data))`; `data` also
        has `state()` (saved with every checkpoint), `close()` and, for the data-wait fraction,
        `wait_s` (seconds its consumer spent blocked). Every checkpoint's record is `meta` plus
        the data position. `log_first` also logs the first step run; `throughput` adds images/s,
        skipped batches and the data-wait fraction to the logged metrics. Closes `data` and the
        checkpoint managers on the way out."""
        out = LoopResult(state, start=start)
        t, job = self.trainer, self.job
        if start >= t.steps:  # a finished run run again: nothing to train, nothing to save
            logging.getLogger("emfm").info(
                "%s: the run's checkpoint is at step %d, trainer.steps=%d: nothing to train "
                "(raise trainer.steps to train longer)",
                desc,
                start,
                t.steps,
            )
            compiled = None
        else:
            compiled, out.compile_s = self.compile(data.example())
        preemption = Preemption(list(t.preempt_signals), every=t.log_every)
        write_status(job.dir, "running", step=start)
        log = _StepLog(self, data, out, sched=sched, accumulate_steps=accumulate_steps)
        log.open(desc, start, throughput)
        ended = {"status": "failed"}  # what status.json says at the end

        def save(mgr, step, extra=None, **kw):
            record = {**meta, "data": data.state(), **(extra or {})}
            return checkpoint.save(mgr, step, out.state, record, **kw)

        try:
            for step in range(start, t.steps):
                signum = preemption.agreed(step)
                if signum is not None:
                    ended.update(status="preempted", signal=signal.Signals(signum).name)
                    self._preempt(save, step, signum, preemption)
                out.state, metrics = compiled(out.state, meshlib.global_batch(next(data), job.mesh))
                out.images += job.batch_size
                last = step + 1 == t.steps
                if (step + 1) % t.log_every == 0 or last or (log_first and step == start):
                    log.write(step, metrics, save)
                log.bar.update(1)
                if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and not last:
                    save(self.mngr, step + 1)
            if start < t.steps:
                jax.block_until_ready(out.state)
            log.finish()
            if start < t.steps:
                save(self.mngr, t.steps, force=True)
            self.mngr.wait_until_finished()
            ended["status"] = "finished"
        finally:
            log.close()
            data.close()
            self._close(preemption, out, **ended)
        return out

    def _close(self, preemption: Preemption, out: LoopResult, status: str, **stopped_by) -> None:
        """Close the checkpoint managers, give the signals back and write status.json."""
        self.mngr.close()
        if self.best is not None:
            self.best.close()
        preemption.restore()
        step = int(jax.device_get(out.state.step)) if status != "failed" else None
        write_status(self.job.dir, status, step=step, **stopped_by)

    def _preempt(self, save: Callable, step: int, signum: int, preemption: Preemption) -> None:
        """Checkpoint `step`, let the scheduler's own handler run, and leave with Preempted."""
        save(self.mngr, step, force=True)
        self.mngr.wait_until_finished()
        preemption.hand_over(signum)
        raise Preempted(
            f"{signal.Signals(signum).name}: saved a checkpoint at step {step} in "
            f"{self.mngr.directory}; run the same command to resume",
            signum,
        )


class _StepLog:
    """What the loop does at a logged step: stop on a non-finite loss (trainer.nonfinite=stop),
    write the metrics with the learning rate (and throughput) to JSONL / TensorBoard and the
    progress bar, and keep the checkpoint of the best `trainer.best_metric`."""

    def __init__(self, engine: Engine, data, out: LoopResult, *, sched, accumulate_steps: int):
        self.engine, self.trainer, self.out = engine, engine.trainer, out
        self.sched, self.accumulate_steps = sched, accumulate_steps
        self.wait = lambda: getattr(data, "wait_s", 0.0)
        self.best_value = math.inf

    def open(self, desc: str, start: int, throughput: bool) -> None:
        t, main = self.trainer, self.engine.job.main_proc
        self.writer = MetricWriter(self.engine.job.dir, tensorboard=t.tensorboard) if main else None
        self.bar = progress(t.steps, initial=start, desc=desc, enabled=t.progress and main)
        self.throughput = throughput
        self.t0 = time.perf_counter()
        self.wait0 = self.wait()
        self.window = [self.t0, self.wait0]  # start of the logging window: time, data wait so far

    def write(self, step: int, metrics, save: Callable) -> None:
        t, out = self.trainer, self.out
        m = jax.device_get(metrics)
        bad, first_bad = int(out.state.nonfinite), int(out.state.first_bad)
        if bad and t.nonfinite == "stop":
            raise NonFiniteLoss(
                f"non-finite loss or gradient at step {first_bad}; its update was not applied and "
                f"the last good checkpoint in {self.engine.mngr.directory} is kept "
                "(trainer.nonfinite=skip skips such batches instead)"
            )
        loss = float(m["loss"])
        out.losses.append(loss)
        m.update(lr=self.sched(step // self.accumulate_steps))
        postfix = {"loss": f"{loss:.4f}"}
        if self.throughput:
            now = time.perf_counter()
            rate = out.images / (now - self.t0)
            # share of this logging window's wall time the loop spent blocked on the data
            wait_frac = (self.wait() - self.window[1]) / max(now - self.window[0], 1e-9)
            self.window[:] = [now, self.wait()]
            m.update(images_per_s=rate, skipped_batches=bad, data_wait_fraction=wait_frac)
            postfix["img_s"] = f"{rate:.1f}"
        if self.writer is not None:
            self.writer.write(step + 1, m)
        self.bar.set_postfix(refresh=False, **postfix)  # drawn with the next update, rate-limited
        best = self.engine.best
        if best is not None and t.best_metric in m and float(m[t.best_metric]) < self.best_value:
            self.best_value = v = float(m[t.best_metric])
            save(best, step + 1, {"best": v}, metrics={t.best_metric: v}, force=True)

    def finish(self) -> None:
        self.out.loop_s = time.perf_counter() - self.t0
        self.out.wait_s = self.wait() - self.wait0

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
