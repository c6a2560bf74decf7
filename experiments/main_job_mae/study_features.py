"""Shared by the study scripts: the bundled sample's 30 sections and membrane labels, and the probe
features (64-px windows, patch embedding + final tokens, as the main job) of a checkpoint's encoder
("pre") or of the same architecture at random init ("rnd0" = seed 1000, ...)."""

from emfm.config.schema import ModelConfig
from emfm.data import bundled
from emfm.data.sampling import Region, estimate_range
from emfm.data.volume import open_volume
from emfm.eval import probe
from emfm.export.features import encode_sections
from emfm.train.state import build_encoder, load_encoder


def load(ckpt):
    """(images, membrane labels, features(name)) for all 30 sections."""
    img, lab = open_volume(bundled.sample_raw()), open_volume(bundled.sample_membranes())
    x, y = probe.read_sections(img, (0, 30)), probe.read_sections(lab, (0, 30)) == 1
    enc, meta = load_encoder(ckpt)
    grey = tuple(
        meta.get("grey_range")
        or estimate_range(Region.of(img, [[0, 20], [0, img.shape[1]], [0, img.shape[2]]]))
    )

    def features(name):
        e = (
            enc
            if name == "pre"
            else build_encoder(ModelConfig(**meta["model"]), seed=1000 + int(name[3:]))
        )
        return encode_sections(
            e, probe.normalise(x, grey), tile=32, margin=16, batch_size=8, embed=True
        )

    return x, y, features
