"""The pretraining data of a config: one volume (`data.path`) or a weighted mixture
(`data.sources`), opened, range-estimated and wrapped in a deterministic PatchLoader.

Library code: it receives a `DataConfig` (emfm.config.pretrain), never a Hydra object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from emfm.data import bundled
from emfm.data.loader import PatchLoader
from emfm.data.sampling import PatchSampler, Region, estimate_range
from emfm.data.volume import Volume, VolumeError, open_volume

log = logging.getLogger("emfm")


@dataclass(frozen=True)
class Source:
    """An opened mixture member: its region, grey range, weight, and optional mask / label
    volumes."""

    region: Region
    grey_range: tuple[float, float]
    weight: float
    mask: Volume | None = None
    labels: Volume | None = None

    def describe(self) -> dict:
        v = self.region.volume
        return {
            "path": v.path,
            "weight": self.weight,
            "shape": list(v.spatial_shape),
            "voxel_size": list(v.voxel_size),
            "roi": [list(b) for b in self.region.box],
            "grey_range": list(self.grey_range),
            "mask": self.mask.path if self.mask else None,
            "labels": self.labels.path if self.labels else None,
        }


def _open(path: str, what: str, **kw) -> Volume:
    if what == "data.path":  # a single volume: open_volume's own "volume not found: PATH"
        vol = open_volume(path, **kw)
    else:
        try:
            vol = open_volume(path, **kw)
        except FileNotFoundError:
            raise VolumeError(f"{what}: volume not found: {path}") from None
        except VolumeError as e:
            raise VolumeError(f"{what}: {e}") from None
    if vol.ndim not in (2, 3):
        raise VolumeError(
            f"{what}: volume {path} has shape {vol.shape} (axes {''.join(vol.axes)}); patches are "
            "read from single-channel z, y, x (or y, x) volumes: store one channel per volume"
        )
    return vol


def ensure_built(s, what: str = "data.sources[i]") -> None:
    """Import `s.source` (sections `s.source_sections`) into the OME-Zarr `s.path` unless a volume
    built from the same file and sections is there. The import writes to a temporary folder renamed
    into place when complete, so an interrupted build leaves nothing half-written at `path`."""
    if not s.source:
        return
    dst = Path(s.path)
    meta = dst / "zarr.json"
    if meta.exists():
        _check_built(s, json.loads(meta.read_text()), dst, what)
        return
    if dst.exists():
        raise VolumeError(
            f"{what}: {dst} exists but is not an OME-Zarr group (no zarr.json); remove it to "
            "rebuild"
        )
    _build(s, dst, what)


def _check_built(s, group: dict, dst: Path, what: str) -> None:
    """An error unless the group at `dst` was built from the source file and sections that `s`
    asks for, with at least its number of scale levels."""
    want = {
        "source": Path(s.source).name,
        "source_sections": [int(v) for v in s.source_sections]
        if s.source_sections is not None
        else None,
    }
    got = group.get("attributes", {}).get("emfm", {})
    have = {k: got.get(k) for k in want}
    if have != want:
        raise VolumeError(
            f"{what}: {dst} was built from {have}, the config asks for {want}; remove it to rebuild"
        )
    levels = len(group["attributes"]["ome"]["multiscales"][0]["datasets"])
    if levels < s.source_levels:
        raise VolumeError(
            f"{what}: {dst} has {levels} scale levels, the config asks for {s.source_levels}; "
            "remove it to rebuild"
        )


def _build(s, dst: Path, what: str) -> None:
    """Import into a temporary folder beside `dst`, then rename it into place."""
    from emfm.data.importer import import_volume

    tmp = dst.with_name(f"{dst.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "%s: importing %s sections %s into %s", what, s.source, s.source_sections or "all", dst
    )
    import_volume(
        s.source,
        tmp,
        voxel_size=s.source_voxel_size or [1.0, 1.0, 1.0],
        chunks=(1, 256, 256),
        levels=s.source_levels,
        progress=False,
        sections=s.source_sections,
    )
    try:
        tmp.rename(dst)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / "zarr.json").exists():
            raise


def open_sources(data, *, seed: int = 0) -> list[Source]:
    """Open the volumes a DataConfig names (`sources`, else `path` / `roi`), each with its grey
    range; sources with a `source` file are built first (ensure_built)."""
    specs = data.sources or [_single(data)]
    out = []
    for i, s in enumerate(specs):
        what = f"data.sources[{i}]" if data.sources else "data.path"
        ensure_built(s, what)
        path = bundled.resolve(s.path, bundled.sample_raw())
        vol = _open(path, what, level=s.level, voxel_size=s.voxel_size)
        region = Region.of(vol, s.roi)
        # masks and labels that are OME-Zarr groups are opened at the image's scale
        scale = {"level": s.level, "voxel_size": s.voxel_size}
        mask = _open(s.mask, f"{what}.mask", **scale) if s.mask else None
        labels = _open(s.labels, f"{what}.labels", **scale) if s.labels else None
        grey = estimate_range(region, samples=data.intensity_samples, seed=seed, mask=mask)
        out.append(Source(region, grey, float(s.weight), mask, labels))
        log.info(
            "data source %d: %s roi=%s weight=%g grey range [%.1f, %.1f]%s%s",
            i,
            vol,
            region.box,
            s.weight,
            *grey,
            f" mask={mask.path}" if mask else "",
            f" labels={labels.path}" if labels else "",
        )
    if sum(s.weight for s in out) <= 0:
        raise VolumeError(f"data.sources: weights {[s.weight for s in out]} have zero total weight")
    if (
        data.sources
    ):  # a mixture keeps the members a patch fits in (a small volume among large ones)
        fits = [s for s in out if all(p <= n for p, n in zip(data.patch_shape, s.region.shape))]
        for i, s in enumerate(out):
            if s not in fits:
                log.warning(
                    "data.sources[%d] %s: region %s is smaller than the patch %s; left out of this "
                    "run",
                    i,
                    s.region.volume.path,
                    s.region.shape,
                    tuple(data.patch_shape),
                )
        if not fits:
            raise VolumeError(
                f"data.sources: no source is as large as the patch shape {tuple(data.patch_shape)}"
            )
        out = fits
    return out


def _single(data):
    from emfm.config.pretrain import SourceConfig

    return SourceConfig(path=data.path, roi=data.roi)


def make_loader(
    data,
    sources: list[Source],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    views: int = 1,
    prefetch: int | None = None,
) -> PatchLoader:
    """A PatchLoader over the mixture: `batch_size` patches per process and step; labels only steer
    sampling (min_foreground, balance_classes), batches carry images."""
    sampler = PatchSampler(
        [s.region for s in sources],
        data.patch_shape,
        batch_size,
        weights=[s.weight for s in sources],
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    has_labels = any(s.labels is not None for s in sources)
    has_masks = any(s.mask is not None for s in sources)
    aug = dataclasses.asdict(data.aug)
    return PatchLoader(
        sampler,
        [s.grey_range for s in sources],
        augment_batches=data.augment,
        prefetch=data.prefetch if prefetch is None else prefetch,
        start_step=start_step,
        labels=[s.labels for s in sources] if has_labels else None,
        masks=[s.mask for s in sources] if has_masks else None,
        min_mask=data.min_mask,
        min_std=data.min_std,
        min_foreground=data.min_foreground,
        balance_classes=data.balance_classes,
        max_redraws=data.max_redraws,
        views=views,
        return_labels=False,
        aug=aug,
    )
