"""Where the Hydra configs are: `EMFM_CONFIG_DIR`, else the ones shipped inside the package
(`emfm/configs`; in a clone a link to the repository's `configs/`), else `configs/` beside the
package. `--config-dir DIR` on any command adds a directory searched first (Hydra)."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> str:
    env = os.environ.get("EMFM_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    packaged = Path(__file__).resolve().parents[1] / "configs"
    if packaged.is_dir():
        return str(packaged.resolve())
    repo = Path(__file__).resolve().parents[2] / "configs"
    if repo.is_dir():
        return str(repo)
    raise SystemExit(f"emfm: error: no configs in {packaged} or {repo}; set EMFM_CONFIG_DIR")
