"""Peak memory of `emfm predict` (emfm.segment.predict.predict_volume) does not grow with the volume.

Writes random uint8 volumes of two sizes as zarr (section by section), predicts
each in a fresh process with the same tiny ViT + progressive head, and records the peak resident
memory (ru_maxrss) of each process and the output size held in one piece, in
experiments/benchmarks/predict_memory.json.

  PYTHONPATH=. python benchmarks/predict_memory.py [--small 2,512,512] [--large 8,1536,1536]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(vol_path: str, out_path: str) -> None:
    sys.path.insert(0, str(REPO))
    from emfm.config.schema import HeadConfig, ModelConfig, TaskConfig
    from emfm.data.volume import open_volume
    from emfm.segment import targets
    from emfm.segment.predict import model_fn, predict_volume
    from emfm.segment.train import build_model

    task = TaskConfig()
    model = build_model(ModelConfig(width=32, depth=1, heads=2, patch_size=[8, 8]), HeadConfig(name="progressive", width=16),
                        task)
    lay = targets.layout(task, 2)
    vol = open_volume(vol_path)
    t0 = time.perf_counter()
    res = predict_volume(model_fn(model, lay, ndim=2, batch_size=8), lay.channels, vol, out_path, grey_range=(0, 255),
                         window=[1, 256, 256], overlap=[0, 32, 32], chunk=[1, 512, 512], resume=False,
                         show_progress=False)
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", default="2,512,512")
    ap.add_argument("--large", default="8,1536,1536")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    sys.path.insert(0, str(REPO))
    import numpy as np

    from emfm.data.volume import create_volume

    records = []
    with tempfile.TemporaryDirectory() as d:
        for name in ("small", "large"):
            shape = tuple(int(v) for v in getattr(a, name).split(","))
            vol = Path(d) / f"{name}.zarr"
            v = create_volume(vol, shape, np.uint8, chunks=(1, 512, 512))
            rng = np.random.default_rng(0)
            for z in range(shape[0]):  # written section by section: the generator holds one section
                v.array[z].write(rng.integers(0, 256, shape[1:], dtype=np.uint8)).result()
            out = subprocess.run([sys.executable, __file__, "--child", str(vol), str(Path(d) / f"{name}_pred.zarr")],
                                 capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            voxels = shape[0] * shape[1] * shape[2]
            rec.update(volume=list(shape), voxels=voxels,
                       output_in_one_piece_mb=voxels * 2 * 4 / 2**20)  # float32 probabilities, 2 classes
            records.append(rec)
            print(json.dumps(rec), flush=True)
    ratio = records[1]["peak_rss_mb"] / records[0]["peak_rss_mb"]
    summary = {"records": records, "voxel_ratio": records[1]["voxels"] / records[0]["voxels"], "peak_rss_ratio": ratio}
    dst = REPO / "experiments" / "benchmarks" / "predict_memory.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))


if __name__ == "__main__":
    main()
