"""The device half of the input pipeline (emfm.data.device): native-dtype batches made float32 and
augmented inside the step equal the host pipeline they replace."""

from __future__ import annotations

import numpy as np
import pytest

from emfm.data import augment, device
from emfm.data.loader import PatchLoader
from emfm.data.sampling import PatchSampler, Region, normalise_into
from emfm.data.volume import write_array


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev")
    rng = np.random.default_rng(0)
    a = write_array(d / "a", rng.integers(0, 256, (4, 32, 32)).astype(np.uint8), chunks=(2, 16, 16))
    b = write_array(
        d / "b", rng.integers(0, 4096, (4, 32, 32)).astype(np.uint16), chunks=(2, 16, 16)
    )
    return a, b


def _rngs(n=6):
    return [np.random.default_rng([3, i]) for i in range(n)]


def test_device_normalisation_equals_host_normalisation(vols):
    # two sources with their own ranges (values beyond them clip) and dtypes: the batch is uint16,
    # each patch carries its source's constants
    ranges = [(20.5, 230.25), (100.0, 3000.0)]
    ld = PatchLoader(
        PatchSampler([Region.of(v) for v in vols], (2, 8, 8), 8, seed=2),
        ranges,
        augment_batches=False,
        prefetch=1,
    )
    ld.close()
    batch = ld.load(4)
    assert batch["image"].dtype == np.uint16 and batch["image_norm"].shape == (8, 2)
    got = ld.finished(4)["image"]
    data = [v.read() for v in vols]
    for img, (v, (z, y, x)) in zip(got, ld.sampler.origins(4)):
        want = normalise_into(
            data[v][z : z + 2, y : y + 8, x : x + 8], *ranges[v], np.empty((2, 8, 8), np.float32)
        )
        np.testing.assert_allclose(img, want, atol=1e-6, rtol=0)
    assert {v for v, _ in ld.sampler.origins(4)} == {0, 1} and got.min() == 0.0 and got.max() == 1.0


@pytest.mark.parametrize(
    "ops", [["flip_rot", "intensity"], ["flip_rot", "elastic", "sections", "blur", "intensity"]]
)
def test_deferred_augmentation_equals_host_augmentation(ops):
    raw = np.random.default_rng(1).integers(0, 256, (6, 2, 16, 16)).astype(np.uint8)
    lab = (raw // 64).astype(np.int32)
    norm = np.tile(np.array([10.0, 1 / 200.0], np.float32), (6, 1))
    x = normalise_into(raw, 10.0, 210.0, np.empty(raw.shape, np.float32))
    kw = {"p_elastic": 1.0, "p_missing": 0.2, "p_blur": 1.0}
    want, want_lab = augment.per_example(_rngs(), x, lab, ops=ops, **kw)
    entries, (got_lab,) = augment.per_example_deferred(_rngs(), raw, norm, lab, ops=ops, **kw)
    # flips alone keep the host batch in uint8; a float op makes it float32 with identity constants
    assert entries["image"].dtype == (np.float32 if "elastic" in ops else np.uint8)
    np.testing.assert_allclose(device.finish_host(entries)["image"], want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got_lab, want_lab)  # labels move with images, as before


def test_device_noise_is_seeded_per_example():
    raw = np.full((4, 1, 32, 32), 128, np.uint8)
    norm = np.tile(np.array([0.0, 1 / 255.0], np.float32), (4, 1))
    ops = ["noise"]
    a, _ = augment.per_example_deferred(_rngs(4), raw, norm, ops=ops, noise=0.2)
    b, _ = augment.per_example_deferred(_rngs(4)[2:], raw[2:], norm[2:], ops=ops, noise=0.2)
    fa, fb = device.finish_host(a)["image"], device.finish_host(b)["image"]
    np.testing.assert_array_equal(fa[2:], fb)  # an example's noise does not depend on its batch
    sd = (fa - 128 / 255.0).reshape(4, -1).std(1)
    # the drawn sigma of each example
    np.testing.assert_allclose(sd, a["image_grey"][:, 3], rtol=0.15)
    assert len(set(a["image_seed"].tolist())) == 4
    # two views: seeded, different from each other, and from the same uint8 patches
    v1, v2 = augment.two_views_deferred(
        np.random.default_rng(0), raw[:1], norm[:1], ops=["flip_rot", "intensity", "noise"]
    )
    w1, _ = augment.two_views_deferred(
        np.random.default_rng(0), raw[:1], norm[:1], ops=["flip_rot", "intensity", "noise"]
    )
    assert v1["image"].dtype == np.uint8 and set(v2) == {
        "image2",
        "image2_norm",
        "image2_grey",
        "image2_seed",
    }
    f = device.finish_host({**v1, **v2})
    np.testing.assert_array_equal(f["image"], device.finish_host(w1)["image"])
    assert not np.array_equal(f["image"], f["image2"])
