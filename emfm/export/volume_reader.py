"""Windows of a tensorstore volume for the windowed encoder, read ahead of it in a thread: all reads
of a batch are in flight at once, and `depth` batches are read while the encoder works."""

from __future__ import annotations

import queue
import threading

import numpy as np

from emfm.data.volume import Volume
from emfm.export.encode import BlockEncoder, WindowReader, normalise
from emfm.export.windows import pad_window, window_region


def read_batch(vol: Volume, box, batch, enc: BlockEncoder, grey_range) -> np.ndarray:
    """Normalised windows of a batch of blocks (ROI coordinates), all reads in flight at once."""
    off = [b[0] for b in box]
    plans = [
        window_region(
            [o + a - m for o, a, m in zip(origin, off, enc.margin)], enc.window, vol.shape
        )
        for origin in batch
    ]
    futs = [vol.read_async(region) for region, _ in plans]
    wins = [pad_window(vol.result(f, region), pad) for f, (region, pad) in zip(futs, plans)]
    return normalise(np.stack(wins), grey_range)


def volume_reader(vol: Volume, box, grey_range, depth: int) -> WindowReader:
    """`read(encoder, origins)` over the ROI `box` of `vol`: (origins, windows) batches, read
    `depth` batches ahead in a thread (0: in the caller)."""

    def read(enc: BlockEncoder, todo: list):
        bs = enc.batch_size
        batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
        if depth <= 0:
            for b in batches:
                yield b, read_batch(vol, box, b, enc, grey_range)
            return
        yield from _ahead(lambda b: (b, read_batch(vol, box, b, enc, grey_range)), batches, depth)

    return read


def _ahead(work, items: list, depth: int):
    """`work(item)` of each item, computed up to `depth` items ahead in a thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run():
        try:
            for it in items:
                if stop.is_set():
                    return
                q.put(work(it))
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True, name="emfm-export-reader")
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)
