"""How `emfm instances` reads its input volume: boundary probabilities `[z, y, x]` or affinities
`[c, z, y, x]` as float32 in [0, 1], chosen by the user or by what `emfm predict` recorded in the
volume's attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from emfm.data.volume import Volume, VolumeError
from emfm.errors import UserError
from emfm.instances.affinities import DEFAULT_OFFSETS
from emfm.instances.blocks import Box
from emfm.instances.segment import SegmentParams

log = logging.getLogger("emfm")


def volume_reader(
    vol: Volume,
    *,
    kind: str = "auto",
    channel: int | None = None,
    invert: bool = False,
    n_offsets: int | None = None,
) -> tuple[Callable[[Box], np.ndarray], str]:
    """`read(box)` giving float32 boundary maps `[z,y,x]` or affinities `[c,z,y,x]` from a
    probability volume (`z y x` or `z y x c`; integer dtypes are scaled to [0, 1]), and the kind.

    kind: "boundary", "affinities", or "auto" (4D with no `channel` = affinities). `channel`
    picks the boundary class of a multi-channel probability volume; `invert` turns a foreground
    (interior) probability into a boundary probability."""
    if kind not in ("auto", "boundary", "affinities"):
        raise UserError(f"kind={kind!r}: use auto, boundary or affinities")
    if vol.ndim not in (3, 4):
        raise VolumeError(
            f"instance input {vol.path} has shape {vol.shape}; expected z, y, x or z, y, x, c"
        )
    if kind == "auto":
        kind = "affinities" if vol.ndim == 4 and channel is None else "boundary"
    if kind == "affinities" and (vol.ndim != 4 or channel is not None):
        raise VolumeError(
            f"instance input {vol.path}: affinities need a z, y, x, c volume and no channel="
        )
    if kind == "affinities" and n_offsets is not None and vol.shape[3] != n_offsets:
        raise VolumeError(
            f"instance input {vol.path} has {vol.shape[3]} channels but {n_offsets} offsets are "
            "configured"
        )
    if (
        kind == "boundary"
        and vol.ndim == 4
        and (channel is None or not 0 <= channel < vol.shape[3])
    ):
        raise VolumeError(
            f"instance input {vol.path} has {vol.shape[3]} channels"
            + (f", so channel={channel} does not exist" if channel is not None else "")
            + f": give channel=K (0..{vol.shape[3] - 1}) for the boundary class, or "
            "kind=affinities"
        )
    scale = 1.0 / np.iinfo(vol.dtype).max if np.issubdtype(vol.dtype, np.integer) else 1.0

    def read(box: Box) -> np.ndarray:
        x = vol.read(
            tuple(box)
            + ((slice(channel, channel + 1),) if vol.ndim == 4 and kind == "boundary" else ())
        )
        x = x.astype(np.float32) * scale
        if kind == "boundary":
            x = x[..., 0] if x.ndim == 4 else x
            return 1.0 - x if invert else x
        x = np.moveaxis(x, -1, 0)
        return 1.0 - x if invert else x

    return read, kind


def from_attributes(
    vol: Volume, kind: str, channel: int | None, invert: bool, params: SegmentParams
):
    """What `emfm predict` records in its output's attributes decides how it is read when the user
    gave no `channel`: a "boundary" channel by name; else, for a semantic model, 1 - the probability
    of the class whose connected regions are the instances (`instance_class`: cell interiors between
    membranes, or the organelles); else 1 - "foreground" (center task). Recorded affinity offsets
    ("offsets") replace the default ones; a configured set that differs from the recorded one is an
    error naming both. Returns (channel, invert, params)."""
    names = list(vol.attributes.get("channels") or [])
    if vol.ndim == 4 and channel is None and kind in ("auto", "boundary"):
        ic = vol.attributes.get("instance_class")
        if "boundary" in names:
            channel = names.index("boundary")
            log.info("instances: boundary probabilities from channel %d of %s", channel, vol.path)
        elif ic is not None and 0 <= int(ic) < vol.shape[3]:
            channel, invert = int(ic), True
            log.info(
                "instances: boundaries = 1 - p(%s), the instance class of %s",
                names[channel] if names else channel,
                vol.path,
            )
        elif "foreground" in names:
            channel, invert = names.index("foreground"), True
            log.info("instances: boundaries = 1 - p(foreground) of %s", vol.path)
    on_background = False
    if vol.ndim == 4 and channel is not None and invert:
        on_background = bool(vol.attributes.get("objects_on_background"))
    params = _auto(vol, params, on_background)
    recorded = [tuple(int(v) for v in o) for o in vol.attributes.get("offsets") or []]
    if recorded and channel is None:
        configured = [tuple(o) for o in params.offsets]
        if configured != recorded and configured != [tuple(o) for o in DEFAULT_OFFSETS]:
            raise VolumeError(
                f"instance input {vol.path} holds affinities for offsets "
                f"{[list(o) for o in recorded]}, "
                f"but offsets={[list(o) for o in configured]} were given"
            )
        params = replace(params, offsets=tuple(recorded))
    if (
        params.method == "mws"
        and not params.two_d
        and vol.spatial_shape[0] > 1
        and all(o[0] == 0 for o in params.offsets)
    ):
        log.warning(
            "instances: the affinities of %s have no offset across sections: mutex watershed "
            "will not join objects across them; method=multicut or agglomeration on these "
            "affinities, or link2d on a boundary map, does",
            vol.path,
        )
    return channel, invert, params


def _auto(vol: Volume, params: SegmentParams, on_background: bool) -> SegmentParams:
    """`two_d` and `background` left as None (auto) decided from the input's attributes."""
    two_d, background = params.two_d, params.background
    if two_d is None:
        vs = tuple(vol.voxel_size)
        two_d = vol.attributes.get("model_ndim") == 2 or (
            len(vs) == 3 and vs[0] >= 3 * max(vs[1], vs[2])
        )
        log.info("instances: two_d=%s (auto)", two_d)
    if background is None:
        background = 0.5 if on_background else 1.0
        if on_background:
            log.info("instances: objects on a background: p < 0.5 is background (auto)")
    return replace(params, two_d=bool(two_d), background=float(background))
