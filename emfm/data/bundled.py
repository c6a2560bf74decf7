"""The real EM sample shipped inside the package, so emfm works without any download.

A 30 x 384 x 384 crop of the ISBI 2012 training volume (ssTEM of Drosophila first-instar larva
ventral nerve cord, 4 x 4 x 50 nm) with its membrane labels (1 = membrane, 0 = cell interior),
stored as zarr v3 (zstd). Cite: Cardona et al. (2010) PLoS Biol 8(10): e1000502; Arganda-Carreras
et al. (2015) Front. Neuroanat. 9:142. Research / non-commercial use with citation.
Rebuilt by `scripts/make_sample.py` from ../shared/data/em/isbi2012.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample" / "isbi2012_sample"
# What pretraining reads of the sample when `data.roi` is unset: sections 0..19, the probe's
# training (0..15) and validation (16..19) sections; 20..29 stay unseen until the probe's test.
PRETRAIN_ROI = [[0, 20], [0, 384], [0, 384]]
# What fine-tuning trains on and scores of the sample when `data.train_roi` / `data.test_roi` are
# unset (a volume of the user's: the whole volume, no held-out score)
FINETUNE_TRAIN_ROI = [[0, 20], [0, 384], [0, 384]]
FINETUNE_TEST_ROI = [[20, 30], [0, 384], [0, 384]]


def sample_raw() -> str:
    return str(SAMPLE_DIR / "raw")


def sample_membranes() -> str:
    return str(SAMPLE_DIR / "membranes")


def resolve(path: str, default: str) -> str:
    """An empty config path means the bundled sample."""
    return path if path else default
