"""The host record that run summaries keep (emfm.train.loop.host_record)."""

from __future__ import annotations

import json
import os

import jax
import jaxlib

from emfm.train.loop import host_record


def test_host_record_names_this_machine():
    h = host_record()
    assert set(h) == {
        "cpu",
        "cpu_count",
        "platform",
        "backend",
        "device_kind",
        "jax",
        "jaxlib",
    }
    assert h["cpu"] and isinstance(h["cpu"], str)
    assert h["cpu_count"] == os.cpu_count()
    assert h["backend"] == jax.default_backend()
    assert h["device_kind"] == jax.devices()[0].device_kind
    assert (h["jax"], h["jaxlib"]) == (jax.__version__, jaxlib.__version__)
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            assert h["cpu"] == names[0]
    assert json.loads(json.dumps(h)) == h  # goes into the JSON summaries as is
