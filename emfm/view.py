"""Look at volumes and what emfm made of them in neuroglancer, served from this process.

`serve(paths)` opens every path with tensorstore and adds one neuroglancer layer per volume (or per
channel of a probability map), each streamed chunk by chunk from the file as the browser asks for
it, so a volume larger than memory is never read whole. What a volume is, and so how it is shown,
comes from its dtype, shape and attributes (`classify`):

- raw     grey image (z, y, x), grey shader with a contrast range from the volume's central chunk;
- features  `emfm export` output (z, y, x, c): the first three principal components as RGB. The PCA
            basis is fitted on a random sample of chunks; each chunk the browser asks for is then
            read, projected and scaled to uint8 on the fly (`PCAProjection`), nothing is written;
- probabilities  `emfm predict` output (z, y, x, c, "content": "probabilities"): one image layer per
            channel with a heat shader whose opacity is the probability;
- labels  integer label volumes (instances, `emfm discover` clusters, ground truth):
          segmentation layers; 32/64-bit integers always, 8/16-bit ones when their attributes or
          name say they are labels.

A run directory shows every volume the run wrote plus the raw volume it read (found from the
products' "source" attribute, or from its config.yaml; an empty path there is the bundled sample).
Volumes are placed in physical space (nm) from their voxel sizes and offsets: an OME-Zarr
translation (feature grids), or the `roi` a prediction was made of.

Modules: view_plan.py (what is shown and where), view_data.py (the data served, PCA RGB),
view_browser.py (screenshots in a headless Chromium); this one builds and serves the viewer.
"""

from __future__ import annotations

import logging
import webbrowser
from collections.abc import Sequence
from typing import Any

import numpy as np

from emfm.errors import UserError
from emfm.view_data import as_zyx, fit_pca, image_source, label_source, sample_range
from emfm.view_plan import Entry, Plan, plan, spatial_shape, spatial_vs

log = logging.getLogger("emfm.view")

PANEL_PX = 900  # the width of the viewer in a browser window the initial zoom fits the volume into

GREY_SHADER = """#uicontrol invlerp normalized(range=[{lo}, {hi}])
void main() {{
  emitGrayscale(normalized());
}}
"""
RGB_SHADER = """void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)), \
toNormalized(getDataValue(2))));
}
"""
HEAT_SHADER = """#uicontrol invlerp normalized(range=[{lo}, {hi}])
#uicontrol float opacity slider(min=0, max=1, default=0.7)
void main() {{
  float p = clamp(normalized(), 0.0, 1.0);
  emitRGBA(vec4(colormapJet(p), p * opacity));
}}
"""


def _dims(ng: Any, vs: Sequence[float], channels: bool) -> Any:
    names = ["z", "y", "x"] + (["c^"] if channels else [])
    units = ["nm"] * 3 + ([""] if channels else [])
    scales = [float(v) for v in vs] + ([1.0] if channels else [])
    return ng.CoordinateSpace(names=names, units=units, scales=scales)


def _source(ng: Any, data: Any, entry: Entry, ref_vs: Sequence[float], volume_type: str) -> Any:
    """A neuroglancer data source for `data` (z, y, x[, c]) placed where `entry` lies: voxel i of
    the volume covers [offset + (i - 1/2) vs, offset + (i + 1/2) vs) in nm, shifted by half a
    reference voxel so the reference (raw) volume's voxels sit on neuroglancer's integer grid."""
    vs = spatial_vs(entry.volume)
    channels = len(data.shape) == 4
    dims = _dims(ng, vs, channels)
    lv = ng.LocalVolume(data=data, dimensions=dims, volume_type=volume_type)
    corner = [o - v / 2 + r / 2 for o, v, r in zip(entry.offset_nm, vs, ref_vs)]  # nm
    shift = [c / v for c, v in zip(corner, vs)]
    if not any(abs(s) > 1e-9 for s in shift):
        return lv
    rank = len(data.shape)
    matrix = np.zeros((rank, rank + 1))
    matrix[:, :rank] = np.eye(rank)
    matrix[:3, rank] = shift
    return ng.LayerDataSource(
        url=lv, transform=ng.CoordinateSpaceTransform(output_dimensions=dims, matrix=matrix)
    )


def _layers(ng: Any, entry: Entry, ref_vs: Sequence[float]) -> list[tuple[str, Any]]:
    """(name, layer) pairs for one volume."""
    vol = entry.volume
    arr = as_zyx(vol.array)
    if entry.kind == "raw":
        lo, hi = sample_range(vol)
        return [
            (
                entry.name,
                ng.ImageLayer(
                    source=_source(ng, image_source(arr), entry, ref_vs, "image"),
                    shader=GREY_SHADER.format(lo=_num(lo), hi=_num(hi)),
                ),
            )
        ]
    if entry.kind == "labels":
        src = _source(ng, label_source(arr, vol.path), entry, ref_vs, "segmentation")
        return [(entry.name, ng.SegmentationLayer(source=src))]
    if entry.kind == "features":
        proj = fit_pca(vol)
        return [
            (
                entry.name + " (PCA RGB)",
                ng.ImageLayer(source=_source(ng, proj, entry, ref_vs, "image"), shader=RGB_SHADER),
            )
        ]
    # probabilities: one heat layer per channel
    if vol.ndim == 3:
        chans = [(entry.name, arr)]
    else:
        names = vol.attributes.get("channels") or []
        if not (isinstance(names, list) and len(names) == vol.shape[3]):
            names = [f"c{i}" for i in range(vol.shape[3])]
        chans = [(f"{entry.name}:{n}", arr[..., i]) for i, n in enumerate(names)]
    hi = {"uint8": 255, "uint16": 65535}.get(vol.dtype.name, 1)
    return [
        (
            name,
            ng.ImageLayer(
                source=_source(ng, image_source(a), entry, ref_vs, "image"),
                shader=HEAT_SHADER.format(lo=0, hi=hi),
            ),
        )
        for name, a in chans
    ]


def _num(v: float) -> str:
    return f"{v:.6g}"


def _ensure_server(ng: Any, bind: str, port: int) -> None:
    """Start neuroglancer's web server on `bind`:`port` (0: any free port); restart it if it runs
    elsewhere."""
    from neuroglancer import server as ng_server

    if ng_server.is_server_running():
        args = ng_server.global_server_args
        if args.get("bind_address") == bind and (port == 0 or ng_server.global_server.port == port):
            return
        ng.stop()
    ng.set_server_bind_address(bind_address=bind, bind_port=port)
    try:
        ng_server.start()
    except OSError as e:
        raise UserError(
            f"cannot serve on {bind}:{port}: {e} (choose another --bind / --port)"
        ) from e


def build_viewer(p: Plan, *, bind: str = "127.0.0.1", port: int = 0) -> Any:
    """A neuroglancer viewer showing the volumes of `p` (see the module doc for the layout)."""
    import neuroglancer as ng

    if not p.entries:
        raise UserError("nothing to show")
    _ensure_server(ng, bind, port)
    # the view opens on the middle of what a run made (a prediction may cover a few sections of its
    # input)
    focus = next((e for e in p.entries if e.kind != "raw"), p.entries[0])
    ref_vs = [min(spatial_vs(e.volume)[i] for e in p.entries) for i in range(3)]
    layers: list[tuple[str, Any, str]] = []
    visible: dict[str, bool] = {}
    shown: set[str] = set()
    for e in p.entries:
        made = _layers(ng, e, ref_vs)
        # Overlays of one kind hide each other: the first volume of each kind shows (a probability
        # map its last channel, the foreground class); the others are in the layer list, switched
        # off.
        for i, (n, lay) in enumerate(made):
            visible[n] = e.kind == "raw" or (
                e.kind not in shown and (e.kind != "probabilities" or i == len(made) - 1)
            )
            layers.append((n, lay, e.kind))
        shown.add(e.kind)
    viewer = ng.Viewer()
    with viewer.txn() as s:
        s.dimensions = ng.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=ref_vs[::-1])
        for name, lay, _ in layers:
            s.layers[name] = lay
            s.layers[name].visible = visible[name]
        # the middle of the focus volume, in global (x, y, z) voxel units; z on a voxel centre
        vs, shape = spatial_vs(focus.volume), spatial_shape(focus.volume)
        middle = (shape[0] // 2 + 0.5, shape[1] / 2, shape[2] / 2)  # voxels from the corner
        centre_nm = [
            o - v / 2 + r / 2 + v * m for o, v, r, m in zip(focus.offset_nm, vs, ref_vs, middle)
        ]
        s.position = [c / r for c, r in zip(centre_nm, ref_vs)][::-1]
        feats = [n for n, _, k in layers if k == "features"]
        others = [n for n, _, k in layers if k != "features"]
        extent = max(shape[1] * vs[1], shape[2] * vs[2]) / min(ref_vs[1:])  # global voxels across
        # fit one panel
        s.cross_section_scale = extent / (PANEL_PX / 2 if feats and others else PANEL_PX)
        if (
            feats and others
        ):  # features side by side with the raw volume and its overlays, positions linked
            s.layout = ng.row_layout(
                [
                    ng.LayerGroupViewer(layers=others, layout="xy"),
                    ng.LayerGroupViewer(layers=feats, layout="xy"),
                ]
            )
        else:
            s.layout = "xy"
    return viewer


def serve(
    paths: list[str], *, bind: str = "127.0.0.1", port: int = 0, open_browser: bool = False
) -> tuple[Any, str]:
    """Serve `paths` (volumes and run directories) in neuroglancer; returns (viewer, url). The
    server runs in a background thread of this process for as long as the process lives."""
    p = plan(paths)
    for note in p.notes:
        log.warning("%s", note)
    viewer = build_viewer(p, bind=bind, port=port)
    url = str(viewer)
    if open_browser:
        webbrowser.open(url)
    return viewer, url


def served_volume(viewer: Any, url: Any) -> Any:
    """The LocalVolume behind a layer source url (`python://volume/<viewer token>.<volume
    token>`)."""
    if not isinstance(url, str):
        return url
    token = url.rsplit(".", 1)[-1]
    return viewer.volume_manager.volumes[token]


def layer_summary(viewer: Any) -> list[dict]:
    """Name, type (image / segmentation), voxel size (nm, z y x), shape and served url of each
    layer."""
    out = []
    for layer in viewer.state.layers:
        url = layer.layer.source[0].url
        lv = served_volume(viewer, url)
        to_nm = [1e9 if u == "m" else 1.0 for u in lv.dimensions.units[:3]]
        vs = [round(float(v) * f, 6) for v, f in zip(lv.dimensions.scales[:3], to_nm)]
        out.append(
            {
                "name": layer.name,
                "type": layer.layer.type,
                "voxel_size": vs,
                "shape": [int(n) for n in lv.shape],
                "url": url,
                "volume": lv,
            }
        )
    return out
