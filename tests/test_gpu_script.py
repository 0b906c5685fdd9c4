"""bench/gpu.py, the prepared GPU check of the whole pipeline, run end to end at a tiny shape."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_gpu_script_runs_every_stage_at_a_tiny_shape(tmp_path, monkeypatch):
    import gpu
    monkeypatch.setattr(gpu, "OUT", tmp_path)
    rows = gpu.main(["--tiny"])
    assert [r["stage"] for r in rows] == ["build", "importance", "prune", "distill"]
    assert json.loads((tmp_path / "gpu.json").read_text()) == rows  # kept as it goes
    imp, prn, dst = rows[1], rows[2], rows[3]
    assert imp["tokens"] == 8 * 32 and imp["scoring_pass_s"] > 0 and imp["tokens_per_s"] > 0
    assert prn["params"] < 0.8 * gpu.common.param_count(
        gpu.common.shape_of(gpu.common.load_config(str(tmp_path / "teacher"))),
        gpu.common.load_config(str(tmp_path / "teacher")))["total"]
    assert dst["tokens"] == 2 * 4 * 32 and dst["tflops_per_device"] > 0 and dst["mfu"] is None
    assert (tmp_path / "distilled" / "pare.json").is_file()
