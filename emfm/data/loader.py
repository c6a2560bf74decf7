"""Deterministic, resumable streams of random patches from tensorstore volumes.

The origins of batch `step` are a pure function of `(seed, step, process_index)`
(emfm.data.sampling), so a resumed run sees the same batches, and JAX processes draw disjoint
streams. All patches of a batch are read with asynchronous tensorstore reads issued together, and a
background thread keeps `prefetch` batches ready ahead of the training step. Images are
`[b, z, y, x]` in the volumes' native dtype, with each patch's normalisation constants (its
source's estimated grey-value range) beside them: the conversion to float32 in [0, 1] and the
grey-value augmentations run on the device inside the jitted step (emfm.data.device.finish), so the
host thread makes no float32 copy of a batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

import numpy as np

from emfm.data import augment
from emfm.data.sampling import PatchSampler, normalise_into
from emfm.data.volume import Volume, VolumeError

log = logging.getLogger("emfm")


class PatchLoader:
    """Iterator of `{"image": [b, z, y, x] native dtype, "image_norm": float32 [b, 2], ...}` batches
    (plus `"label"` when label volumes are given), prefetched in a background thread; the entries
    are described in emfm.data.device, whose `finish` makes them float32 images on the device
    (`finished(step)` does it here, for host consumers and tests).

    `state()` / `start_step` make it resumable: the batch after a restore is the one that would
    have come next. Optional patch rejection (off by default): `min_std` drops near-constant patches
    (resin, empty background; std of the normalised grey values) and `min_foreground` drops patches
    whose labels are less than this fraction non-zero; with `balance_classes` (label values), patch
    `g` of the global batch must instead hold at least that fraction (or any voxel, if
    `min_foreground` is 0) of class `balance_classes[g % n]`, so each class fills an equal share of
    every batch however rare it is. `masks` (per region, optional; the volume's shape or coarser by
    an integer factor per axis) keep only patches at least `min_mask` inside `mask > 0`. Rejected
    patches are redrawn from `sampler.redraw(step, attempt)`, so the batch stays a pure function of
    the step; after `max_redraws` attempts the draw kept is the last one (with a mask: the one most
    inside it) rather than stalling training, and the first such step is logged.
    Labels only steer sampling when `return_labels` is false. `aug` holds keyword arguments of
    emfm.data.augment.per_example / two_views (`ops`, `view_ops`, strengths): flips and rotations
    run here on the native dtype, elastic / sections / blur here on float32 (then the batch is
    float32), grey values and noise on the device.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        ranges: Sequence[tuple[float, float]],
        *,
        augment_batches: bool = True,
        prefetch: int = 4,
        start_step: int = 0,
        labels: Sequence[Volume | None] | None = None,
        min_std: float = 0.0,
        min_foreground: float = 0.0,
        max_redraws: int = 8,
        views: int = 1,
        masks: Sequence[Volume | None] | None = None,
        min_mask: float = 0.5,
        balance_classes: Sequence[int] = (),
        return_labels: bool = True,
        aug: dict | None = None,
    ):
        self.sampler = sampler
        if views not in (1, 2):
            raise VolumeError(f"views={views}: the loader makes 1 or 2 augmented views per patch")
        self.return_labels = bool(return_labels) and labels is not None
        if views == 2 and self.return_labels:
            raise VolumeError(
                "two-view batches are for self-supervised objectives; give no label volumes"
            )
        self.views = views
        self.ranges = self._per_region(ranges, "grey ranges")
        # per region: lo and scale as normalise_into uses them (float32), so the device's
        # clip((x - lo) * scale, 0, 1) equals the host normalisation
        self._norm = np.array(
            [(np.float32(lo), np.float32(1.0 / (hi - lo))) for lo, hi in self.ranges], np.float32
        )
        self.dtype = np.result_type(*[r.volume.dtype for r in sampler.regions])
        self.labels = None if labels is None else self._checked_labels(labels)
        if (min_foreground > 0 or balance_classes) and self.labels is None:
            what = "balance_classes" if balance_classes else "min_foreground"
            raise VolumeError(f"{what} needs label volumes (labels=...)")
        self.balance = tuple(int(c) for c in balance_classes)
        self.masks = None if masks is None or all(m is None for m in masks) else list(masks)
        self._mask_factor = [] if self.masks is None else self._mask_factors(self.masks)
        if not 0.0 < min_mask <= 1.0:
            raise VolumeError(f"min_mask={min_mask}: must be in (0, 1]")
        self.min_mask = float(min_mask)
        self.aug = dict(aug or {})
        self.min_std = float(min_std)
        self.min_foreground = float(min_foreground)
        self.max_redraws = int(max_redraws)
        self._warned_rejected = False
        self.augment = augment_batches
        self.step = int(start_step)
        self.wait_s = 0.0  # time the consumer spent blocked on data
        self._q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(self.step,), daemon=True)
        self._thread.start()

    def _per_region(self, items: Sequence, what: str) -> list:
        """`items` as a list of one entry per region of the sampler, or an error naming `what`."""
        items, n = list(items), len(self.sampler.regions)
        if len(items) != n:
            raise VolumeError(f"{len(items)} {what} for {n} regions")
        return items

    def _checked_labels(self, labels: Sequence[Volume | None]) -> list[Volume | None]:
        labels = self._per_region(labels, "label volumes")
        for r, lab in zip(self.sampler.regions, labels):
            if lab is not None and lab.spatial_shape != r.volume.spatial_shape:
                raise VolumeError(
                    f"labels {lab.path} of shape {lab.spatial_shape} do not match volume "
                    f"{r.volume.path} of shape {r.volume.spatial_shape}"
                )
        return labels

    def _mask_factors(self, masks: list[Volume | None]) -> list[tuple[int, ...] | None]:
        """Per region, how many volume voxels one mask voxel covers along each axis."""
        factors: list[tuple[int, ...] | None] = []
        for r, m in zip(self.sampler.regions, self._per_region(masks, "mask volumes")):
            f = None
            if m is not None:
                vs, ms = r.volume.spatial_shape, m.spatial_shape
                if len(ms) != 3 or any(a % b or a < b for a, b in zip(vs, ms)):
                    raise VolumeError(
                        f"mask {m.path} of shape {ms} does not match volume {r.volume.path} of "
                        f"shape {vs} (it must have the volume's shape or divide it by an integer "
                        "per axis)"
                    )
                f = tuple(a // b for a, b in zip(vs, ms))
            factors.append(f)
        return factors

    def state(self) -> dict:
        return {"step": self.step, "seed": self.sampler.seed}

    def _read(self, picks) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Read the patches at `picks` (all reads issued before any is awaited) into one batch of
        the native dtype; also gives each patch's fraction inside its mask (1 without masks)."""
        patch = self.sampler.patch
        boxes = [tuple(slice(a, a + p) for a, p in zip(o, patch)) for _, o in picks]
        vols = [self.sampler.regions[v].volume for v, _ in picks]
        futures = [vol.read_async(b) for vol, b in zip(vols, boxes)]
        lab_vols = (
            [None] * len(picks) if self.labels is None else [self.labels[v] for v, _ in picks]
        )
        lab_futures = [None if lv is None else lv.read_async(b) for lv, b in zip(lab_vols, boxes)]
        mask_futures = [None] * len(picks)
        if self.masks is not None:
            mask_futures = [
                None if self.masks[v] is None else self.masks[v].read_async(self._mask_box(v, b))
                for (v, _), b in zip(picks, boxes)
            ]
        out = np.empty((len(picks),) + patch, self.dtype)
        for i, f in enumerate(futures):
            out[i] = vols[i].result(f, boxes[i])
        inside = np.ones(len(picks))
        for i, ((v, _), f) in enumerate(zip(picks, mask_futures)):
            if f is not None:
                box = self._mask_box(v, boxes[i])
                inside[i] = (self.masks[v].result(f, box) > 0).mean()
        if self.labels is None:
            return out, None, inside
        dt = np.result_type(*[lv.dtype for lv in self.labels if lv is not None])
        lab = np.zeros((len(picks),) + patch, dt)
        for i, (lv, f) in enumerate(zip(lab_vols, lab_futures)):
            if lv is not None:
                lab[i] = lv.result(f, boxes[i])
        return out, lab, inside

    def _mask_box(self, v: int, box) -> tuple[slice, ...]:
        """The mask voxels covering a patch box of region `v` (mask coordinates)."""
        return tuple(
            slice(b.start // f, -(-b.stop // f)) for b, f in zip(box, self._mask_factor[v])
        )

    def _keep(
        self,
        picks,
        image: np.ndarray,
        label: np.ndarray | None,
        inside: np.ndarray,
        local: Sequence[int],
    ) -> np.ndarray:
        ok = np.ones(len(image), bool)
        if self.min_std > 0:  # on the normalised grey values, one patch at a time
            tmp = np.empty(image.shape[1:], np.float32)
            ok &= np.array(
                [
                    normalise_into(x, *self.ranges[v], tmp).std() >= self.min_std
                    for x, (v, _) in zip(image, picks)
                ]
            )
        if self.masks is not None:
            ok &= inside >= self.min_mask
        if (self.min_foreground > 0 or self.balance) and label is not None:
            has = np.array([self.labels[v] is not None for v, _ in picks])
            flat = label.reshape(len(label), -1)
            if self.balance:
                cls = np.array(
                    [self.balance[self.sampler.global_index(i) % len(self.balance)] for i in local]
                )
                frac = (flat == cls[:, None].astype(flat.dtype)).mean(axis=1)
                good = frac >= self.min_foreground if self.min_foreground > 0 else frac > 0
            else:
                good = (flat != 0).mean(axis=1) >= self.min_foreground
            ok &= ~has | good
        return ok

    @property
    def rejecting(self) -> bool:
        return (
            self.min_std > 0
            or self.min_foreground > 0
            or bool(self.balance)
            or self.masks is not None
        )

    def sample(self, step: int) -> tuple[list, np.ndarray, np.ndarray | None]:
        """The origins `(region, (z, y, x))` batch `step` keeps after rejection, with their
        patches (native dtype) and labels, before augmentation."""
        picks = self.sampler.origins(step)
        out, lab, inside = self._read(picks)
        if self.rejecting:
            ok = self._keep(picks, out, lab, inside, range(len(picks)))
            for attempt in range(1, self.max_redraws + 1):
                bad = np.flatnonzero(~ok)
                if not bad.size:
                    break
                new = self.sampler.redraw(step, attempt, bad)
                o2, l2, in2 = self._read(new)
                ok2 = self._keep(new, o2, l2, in2, bad)
                # a draw replaces the slot if it is kept, or (still rejected) lies more inside the
                # mask: after the last attempt the best draw stays, not the last one
                take = ok2 | (in2 > inside[bad]) if self.masks is not None else np.ones_like(ok2)
                sel = bad[take]
                ok[sel] = ok2[take]
                out[sel] = o2[take]
                inside[sel] = in2[take]
                if lab is not None:
                    lab[sel] = l2[take]
                for k in np.flatnonzero(take):
                    picks[bad[k]] = new[k]
            left = int((~ok).sum())
            if left and not self._warned_rejected:
                self._warned_rejected = True
                log.warning(
                    "patch loader: %d of %d patches of step %d still fail the rejection rules "
                    "(min_std, min_mask, min_foreground / balance_classes) after max_redraws=%d "
                    "draws; kept as drawn (best inside the mask). Raise data.max_redraws or relax "
                    "the rules if this repeats",
                    left,
                    len(ok),
                    step,
                    self.max_redraws,
                )
        return picks, out, lab

    def load(self, step: int) -> dict:
        """The batch of a given step (deterministic; used by the thread and by tests), as the
        iterator yields it: images in their native dtype with their `_norm` (and `_grey`, `_seed`)
        entries for emfm.data.device.finish."""
        picks, out, lab = self.sample(step)
        if not self.return_labels:
            lab = None
        norm = self._norm[[v for v, _ in picks]]
        if not (self.augment or self.views == 2):
            batch = augment.deferred_keys("image", out, norm, None, None)
            return batch if lab is None else {**batch, "label": lab}
        # one generator per patch, keyed by its global index: the same patch is augmented the
        # same way whatever the number of processes
        rngs = [
            np.random.default_rng([self.sampler.seed, int(step), 1, self.sampler.global_index(i)])
            for i in range(len(out))
        ]
        if self.views == 2:
            kw = {k: v for k, v in self.aug.items() if k != "ops"}
            kw["ops"] = kw.pop("view_ops", augment.DEFAULT_VIEW_OPS)
            views = [
                augment.two_views_deferred(r, out[i : i + 1], norm[i : i + 1], **kw)
                for i, r in enumerate(rngs)
            ]
            return {
                k: np.concatenate([v[j][k] for v in views]) for j in (0, 1) for k in views[0][j]
            }
        batch, moved = augment.per_example_deferred(
            rngs, out, norm, *([] if lab is None else [lab]), **self._single_aug()
        )
        return batch if lab is None else {**batch, "label": moved[0]}

    def finished(self, step: int) -> dict:
        """`load(step)` made float32 by emfm.data.device.finish (on the default device), as
        numpy."""
        from emfm.data import device

        return device.finish_host(self.load(step))

    def _single_aug(self) -> dict:
        return {k: v for k, v in self.aug.items() if k != "view_ops"}

    def _fill(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                batch = self.load(step)
                while not self._stop.is_set():
                    try:
                        self._q.put((step, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except Exception as e:  # noqa: BLE001 - hand the error to the consumer
            self._q.put((step, e))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import time

        t0 = time.perf_counter()
        step, batch = self._q.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(batch, Exception):
            raise batch
        assert step == self.step, (step, self.step)
        self.step += 1
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
