"""Shared test fixtures. Everything runs on a laptop CPU; the real EM lives in ../shared/data/em
(beside the repository, as in CI) or in $EMFM_SHARED_DATA, and the bundled sample is always
there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Shared compilation: every test process (this one and the CLI runs it starts) reuses XLA programs
# compiled by earlier ones through JAX's persistent cache; the many tiny runs of the suite compile
# the same few train steps.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "emfm-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def shared_data() -> Path:
    return Path(os.environ.get("EMFM_SHARED_DATA", REPO.parent / "shared" / "data" / "em"))


def compose(config_name: str = "main", overrides: list[str] | None = None):
    """Compose a config exactly as the CLI does and return the validated dataclass tree."""
    from emfm.config.schema import compose as schema_compose

    return schema_compose(config_name, overrides, run_dir="unused", config_dir=str(CONFIGS))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `emfm ARGS` as a user would (the console entry point of this environment)."""
    exe = Path(sys.executable).parent / "emfm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "emfm.cli.main"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        cmd + list(args), capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=timeout
    )


@pytest.fixture(scope="session")
def tiny_main_run(tmp_path_factory) -> Path:
    """One tiny end-to-end main job on the bundled real sample, shared by the integration tests."""
    run_dir = tmp_path_factory.mktemp("main_tiny")
    # a tiny ViT + MAE main job: the checkpoint the export, probe and fine-tuning tests build on
    # (the default main job, U-Net + zoo, is run by tests/integration/test_main_job.py)
    res = run_cli(
        "main",
        "debug=tiny",
        "model=vit_ti_p8",
        "objective=mae",
        "objective.mask_ratio=0.75",
        "probe.zoo=",
        # the ViT's own output, as `emfm export` writes it (main.yaml's export levels and principal
        # components are the zoo U-Net's)
        "export.layers=[]",
        "export.pca_k=0",
        f"hydra.run.dir={run_dir}",
        "trainer.progress=false",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir
