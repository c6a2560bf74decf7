"""Learning regimes of segmentation (configs/regime/): which parameters train, and the unlabelled
terms.

Supervised: from scratch or a pretrained encoder, which is frozen, partially frozen (the first
`frozen_blocks` ViT blocks or U-Net levels and the embeddings) or fine-tuned with layer-wise lr
decay; both are optimizer settings (emfm.train.optim freeze regexes and layer_decay).
Semi-supervised on unlabelled patches, with two views that share their geometry (so predictions
align voxel by voxel) and differ in grey values, noise and cut-out:
  mean teacher (Tarvainen & Valpola 2017): squared error between the student's probabilities on a
      strong view and the EMA teacher's on a weak view;
  FixMatch (Sohn et al. 2020): the model's own prediction on a weak view, where its confidence
      exceeds `threshold`, is the hard pseudo-label of the strong view.
Unsupervised: k-means or a Gaussian mixture on frozen dense features, clusters matched to classes
by the Hungarian method on the evaluation labels (for scoring only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emfm.errors import UserError


def freeze_patterns(regime, *, unet: bool) -> list[str]:
    """Optimizer freeze regexes (over parameter paths like `encoder/blocks/3/attn/qkv/kernel`)."""
    if regime.encoder == "frozen":
        return ["^encoder/"]
    if regime.encoder == "partial":
        n = max(0, int(regime.frozen_blocks))
        idx = "|".join(str(i) for i in range(n))
        if unet:
            return ["^encoder/stem/"] + ([f"^encoder/down/({idx})/"] if n else [])
        return ["^encoder/(patch_embed|cls_token|registers)"] + (
            [f"^encoder/blocks/({idx})/"] if n else []
        )
    return []


def photometric(rng, x, *, strength: float):
    """Grey-value view of `[b, *sp, 1]` images in [0, 1]: contrast, brightness, gamma, Gaussian
    noise, scaled by `strength`; with strength >= 1 also a random cut-out box per example."""
    b = x.shape[0]
    ks = jax.random.split(rng, 6)
    shape = (b,) + (1,) * (x.ndim - 1)
    c = 1.0 + strength * jax.random.uniform(ks[0], shape, minval=-0.4, maxval=0.4)
    br = strength * jax.random.uniform(ks[1], shape, minval=-0.2, maxval=0.2)
    g = jnp.exp(strength * jax.random.uniform(ks[2], shape, minval=-0.4, maxval=0.4))
    mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    y = jnp.clip((x - mean) * c + mean + br, 0.0, 1.0) ** g
    y = y + strength * 0.05 * jax.random.normal(ks[3], x.shape)
    if strength >= 1.0:  # cut-out: a box of a quarter of each in-plane side, filled with the mean
        sp = x.shape[1:-1]
        h, w = sp[-2] // 4, sp[-1] // 4
        oy = jax.random.randint(ks[4], (b,), 0, sp[-2] - h + 1)
        ox = jax.random.randint(ks[5], (b,), 0, sp[-1] - w + 1)
        yy = jnp.arange(sp[-2])[None, :, None]
        xx = jnp.arange(sp[-1])[None, None, :]
        box = (
            (yy >= oy[:, None, None])
            & (yy < oy[:, None, None] + h)
            & (xx >= ox[:, None, None])
            & (xx < ox[:, None, None] + w)
        )
        box = box.reshape((b,) + (1,) * (x.ndim - 4) + box.shape[1:] + (1,))
        y = jnp.where(box, mean, y)
    return y.astype(jnp.float32)


def _probs(out, lay):
    """The classifying channels as probabilities: softmax classes or sigmoid affinities."""
    if lay.classes:
        return jax.nn.softmax(out[..., : lay.classes])
    return jax.nn.sigmoid(out[..., : lay.sigmoid])


def unlabelled_loss(model, teacher, xu, rng, lay, regime, *, frozen_encoder: bool = False):
    """The semi-supervised term on unlabelled images `xu` and its metrics."""
    kw, ks = jax.random.split(rng)
    weak = photometric(kw, xu, strength=0.25)
    strong = photometric(ks, xu, strength=1.0)
    student = model(strong, frozen_encoder=frozen_encoder)
    if regime.semi == "mean_teacher":
        t = jax.lax.stop_gradient(_probs(teacher(weak), lay))
        loss = jnp.mean((_probs(student, lay) - t) ** 2)
        return loss, {"loss_consistency": loss}
    # FixMatch: pseudo-labels from the model itself on the weak view (no gradient through them)
    p = jax.lax.stop_gradient(_probs(model(weak, frozen_encoder=frozen_encoder), lay))
    if lay.classes:
        conf, pseudo = p.max(-1), p.argmax(-1)
        keep = (conf >= regime.threshold).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(student[..., : lay.classes], pseudo)
    else:
        conf, pseudo = jnp.maximum(p, 1 - p), (p > 0.5).astype(jnp.float32)
        keep = (conf >= regime.threshold).astype(jnp.float32)
        ce = optax.sigmoid_binary_cross_entropy(student[..., : lay.sigmoid], pseudo)
    loss = (ce * keep).sum() / ce.size  # FixMatch: mean over all unlabelled voxels, masked
    return loss, {"loss_pseudo": loss, "pseudo_fraction": keep.mean()}


# ---------------------------------------------------------------------------------------------
# Unsupervised: clustering of frozen dense features


def dense_features(
    encoder, images: np.ndarray, *, tile: int = 128, margin: int = 32, batch: int = 4
):
    """Frozen features at pixel resolution, `[b, y, x, d]` per batch of 2D sections `[n, y, x]` in
    [0, 1] (a generator), encoded by emfm.export.encode in tiles of `tile` pixels, each with
    `margin` pixels of context (a U-Net's margins dropped, a ViT's windows blended; a tile larger
    than the sections is cut to them, rounded up to the encoder's alignment); a ViT's token map
    upsampled bilinearly, a U-Net's decoder output as it is."""
    from emfm.export.encode import alignment, encode

    whole = max(-(-n // a) * a for n, a in zip(images.shape[1:], alignment(encoder)[1:]))
    f = encode(
        encoder, images, tile=min(tile, whole), margin=margin, blend="auto", batch_size=batch
    )
    size = images.shape[1:]
    up = jax.jit(lambda f: jax.image.resize(f, (f.shape[0], *size, f.shape[-1]), "bilinear"))
    for i in range(0, len(images), batch):
        yield np.asarray(up(jnp.asarray(f[i : i + batch])))


def fit_clusters(
    encoder,
    images: np.ndarray,
    method: str,
    k: int,
    *,
    samples: int = 20000,
    seed: int = 0,
    tile: int = 128,
    margin: int = 32,
):
    """k-means (scikit-learn KMeans) or a diagonal Gaussian mixture on `samples` feature vectors
    drawn evenly from the sections `images` (features of `dense_features` in `tile` windows with
    `margin`); returns `predict(images) -> cluster ids [n, y, x]`."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    per = max(1, samples // len(images))
    picked = []
    for f in dense_features(encoder, images, tile=tile, margin=margin):
        f = f.reshape(len(f), -1, f.shape[-1])
        picked += [fi[rng.choice(len(fi), size=min(per, len(fi)), replace=False)] for fi in f]
    s = np.concatenate(picked)
    mean, std = s.mean(0), s.std(0) + 1e-6
    s = (s - mean) / std
    if method == "kmeans":
        model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(s)
    elif method == "gmm":
        model = GaussianMixture(
            n_components=k, covariance_type="diag", random_state=seed, max_iter=200
        ).fit(s)
    else:
        raise UserError(f"clustering {method!r}: use kmeans or gmm")

    def predict(x: np.ndarray) -> np.ndarray:
        out = [
            model.predict((f.reshape(-1, f.shape[-1]) - mean) / std).reshape(f.shape[:-1])
            for f in dense_features(encoder, x, tile=tile, margin=margin)
        ]
        return np.concatenate(out)

    return predict


def hungarian_match(clusters: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class of each cluster: the one-to-one assignment maximising agreement (Hungarian method,
    scipy.optimize.linear_sum_assignment); clusters left over (k > classes) take their majority
    class. Labels < 0 are ignored."""
    from scipy.optimize import linear_sum_assignment

    valid = labels >= 0
    k = int(clusters.max()) + 1
    conf = np.zeros((k, num_classes), np.int64)
    np.add.at(conf, (clusters[valid], labels[valid]), 1)
    rows, cols = linear_sum_assignment(-conf)
    mapping = conf.argmax(1)
    mapping[rows] = cols
    return mapping
