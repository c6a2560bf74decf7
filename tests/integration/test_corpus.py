"""The pretraining corpus (`data=corpus`) leaves out every benchmark task's test sections: checked
against each task file, and by building corpus volumes and sampling from them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS, compose, shared_data
from omegaconf import OmegaConf

ROOT = shared_data().parent  # ../shared/data
pytestmark = pytest.mark.skipif(
    not (ROOT / "em").is_dir(), reason="needs ../shared/data (EMFM_SHARED_DATA)"
)

# The bundled sample (the main job's probe and task sample_membranes) is cut from this file,
# sections 0-29.
BUNDLED_SOURCE = "em/isbi2012/train_volume.tif"


def _corpus(tmp_path):
    os.environ["EMFM_SHARED_DATA_ROOT"] = str(ROOT)
    os.environ["EMFM_CORPUS_DIR"] = str(tmp_path / "corpus")
    try:
        return compose("pretrain", ["data=corpus"]).data
    finally:
        del os.environ["EMFM_CORPUS_DIR"]


def _rel(path_expr: str) -> str:
    """A task file's `${oc.env:EMFM_SHARED_DATA,../shared/data/em}/x/y.tif` -> `em/x/y.tif`."""
    return "em/" + str(path_expr).split("}/", 1)[-1]


def _held_out() -> list[tuple[str, range]]:
    """(source file relative to ../shared/data, held-out sections) of every task and the main
    job."""
    out = []
    for f in sorted((CONFIGS / "probe_task").glob("*.yaml")):
        t = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        if t.get("test_image"):
            # a separate test volume: none of it
            out.append((_rel(t["test_image"]), range(0, 10**6)))
        else:
            out.append(
                (_rel(t["image"]) if t.get("image") else BUNDLED_SOURCE, range(*t["test_slices"]))
            )
    probe = OmegaConf.load(CONFIGS / "main.yaml").get("probe", {})
    # the main job's held-out sections
    out.append((BUNDLED_SOURCE, range(*probe.get("test_slices", [20, 30]))))
    return out


def test_corpus_leaves_out_every_test_section(tmp_path):
    data = _corpus(tmp_path)
    used: dict[str, set[int]] = {}
    for s in data.sources:
        assert s.source, f"corpus source {s.path} is not built from a ../shared file"
        rel = str(Path(s.source).resolve().relative_to(ROOT.resolve()))
        import tifffile

        n = len(tifffile.TiffFile(s.source).pages)
        secs = range(*s.source_sections) if s.source_sections else range(n)
        used.setdefault(rel, set()).update(secs)
    held = _held_out()
    assert len(held) >= 4
    for rel, secs in held:
        overlap = used.get(rel, set()) & set(secs)
        assert not overlap, f"corpus uses held-out sections {sorted(overlap)[:5]}... of {rel}"
    # the corpus covers every unlabelled-usable volume in ../shared/data
    assert {
        "em_unlabelled/hela_sbfsem.tif",
        "em_unlabelled/rat_spinalcord_sem_2d.tif",
        "em/isbi2012/test_volume_unlabelled.tif",
        "em/cdeep3m_sbem_mito/train_images.tif",
        "em/gala_fibsem/train_image.tif",
        BUNDLED_SOURCE,
    } <= set(used)


def test_built_corpus_holds_only_the_kept_sections_and_the_sampler_stays_inside(tmp_path):
    import tifffile

    from emfm.data.sources import ensure_built, open_sources
    from emfm.data.volume import VolumeError, open_volume

    data = _corpus(tmp_path)
    isbi = [s for s in data.sources if s.source.endswith("train_volume.tif")]
    assert isbi and all(s.source_sections == [0, 20] for s in isbi)
    ensure_built(isbi[0])
    vol = open_volume(isbi[0].path, level=0)
    src = tifffile.imread(isbi[0].source)
    assert vol.shape == (20, 512, 512)
    kept = vol.read()
    assert np.array_equal(kept, src[:20])  # exactly the kept sections, nothing of 20..29
    assert vol.attributes["source_sections"] == [0, 20]
    # every patch the sampler reads lies in the kept sections and equals the source there
    from dataclasses import replace

    from emfm.data.sources import make_loader

    small = replace(data, sources=[isbi[0]], prefetch=0, augment=False, min_std=0.0)
    loader = make_loader(small, open_sources(small), batch_size=8, seed=0)
    for step in range(200):
        for v, (z, _y, _x) in loader.sampler.origins(step):
            assert v == 0 and 0 <= z < 20, (step, z)
    picks, image, _ = loader.sample(3)
    for (_v, (z, y, x)), patch in zip(picks, image):
        assert np.array_equal(patch[0], src[z, y : y + 64, x : x + 64])
    loader.close()
    # a corpus volume built from other sections is not silently reused
    wrong = replace(isbi[0], source_sections=[0, 22])
    with pytest.raises(VolumeError, match="remove it to rebuild"):
        ensure_built(wrong)
    # a built corpus is usable where its source files are not (copied to another machine)
    from emfm.config.common import ConfigError
    from emfm.config.pretrain import _validate_source

    elsewhere = replace(isbi[0], source=str(tmp_path / "absent/em/isbi2012/train_volume.tif"))
    _validate_source(elsewhere, "data.sources[0]")
    ensure_built(elsewhere)
    unbuilt = replace(elsewhere, path=str(tmp_path / "corpus/never_built.zarr"))
    with pytest.raises(ConfigError, match="no such file, and no volume built from it"):
        _validate_source(unbuilt, "data.sources[0]")
