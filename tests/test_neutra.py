"""examples/neutra.py in its quick mode: NeuTra with an FFJORD guide gives HMC a deterministic
potential (exact trace in eval mode), a log-det that matches slogdet of the map's Jacobian, and
finite samples from both samplers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("neutra", ROOT / "examples" / "neutra.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run(tmp_path):
    neutra = load()
    payload = neutra.main(neutra.parse_args(["--quick", "--no-progress", "--out", str(tmp_path)]))
    saved = json.loads((tmp_path / "neutra.json").read_text())
    assert (tmp_path / "neutra.png").stat().st_size > 0
    checks = saved["checks"]
    # HMC's potential and its gradient must not change between calls at the same point.
    assert checks["deterministic"], checks
    # The exact trace integrated by the solver vs the autograd Jacobian of the computed map
    # (float32 solve at the example's tolerances; measured ~1e-6).
    assert checks["logdet_gap_max"] < 1e-3, checks
    methods = [r["method"] for r in payload["results"]]
    assert methods == ["NUTS", "NeuTra NUTS (FFJORD)"]
    assert all(r["finite"] for r in payload["results"])
    assert payload["results"][1]["ffjord_solves"] > 0
