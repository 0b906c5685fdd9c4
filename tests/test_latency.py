"""prune.py TARGET_SPEEDUP: measured latency per shape, its cache, the frontier and the search."""

import json
import math

import pytest

import common
import latency
import prune
from conftest import llama_config, olmo3_config
from test_prune import run_main, yarn_olmo  # noqa: F401  (a fixture: tiny Olmo 3 with its scores)

WORK = {"prompt": 16, "new_tokens": 4, "batches": (1, 2), "warmup": 0, "repeats": 1}
TINY = {f"_LATENCY_{k.upper()}": v for k, v in WORK.items()}  # prune.py's constants for WORK
GRIDS = ["_NUM_CANDIDATES=4",
         *[f"{k}={v!r}" for k, v in TINY.items()]]


def fake_latency(config, device, dtype, work):
    """Decode time growing with depth and with width, so that both compete for a speed-up."""
    width = config.hidden_size * config.intermediate_size / (64 * 96)
    ms = config.num_hidden_layers * (0.5 + 0.5 * width)
    return {"prefill_ms": {str(b): 10 * ms * b for b in work["batches"]},
            "decode_ms": {str(b): ms * (1 + 0.1 * b) for b in work["batches"]}}


def test_frontier():
    points = [(1.5, 0.3), (1.6, 0.2), (1.7, 0.4), (1.55, 0.25), (1.6, 0.2)]
    assert latency.frontier(points) == [False, True, True, False, True]


def test_search_meets_the_target_on_the_frontier(yarn_olmo, tmp_path, monkeypatch, capsys):  # noqa: F811
    model_dir, scores, data = yarn_olmo
    monkeypatch.setattr(latency, "measure_latency", fake_latency)
    out = tmp_path / "fast"
    res = run_main(model_dir, scores, data, out, "TARGET_SPEEDUP=1.5", *GRIDS, "SAVE_TOP=2")
    printed = capsys.readouterr().out
    assert "speedup" in printed and "frontier" in printed and "reach 1.5x" in printed
    ranked = res["results"]
    best = ranked[0]
    assert best["latency"]["speedup"] >= 1.5 and best["latency"]["frontier"]
    assert all(1.5 <= r["latency"]["speedup"] <= 1.5 * 1.15 for r in ranked)
    depths = {r["shape"]["num_hidden_layers"] for r in ranked}
    assert 8 in depths and min(depths) < 8  # width-only and deeper cuts both competed
    record = common.read_record(out)
    lat = record["latency"]
    assert lat["candidate"]["speedup"] == pytest.approx(best["latency"]["speedup"])
    assert lat["source"]["decode_ms"]["1"] == pytest.approx(8 * 1.1)
    assert lat["workload"]["batches"] == [1, 2] and lat["device"]
    assert len(record["search"]) == 4 and "latency" in record["search"][0]
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert common.read_record(tmp_path / "fast-2")["rank"] == 2
    # a budget too: every candidate is under it as well
    budget = 0.7 * common.param_count(common.shape_of(common.load_config(model_dir)),
                                      common.load_config(model_dir))["total"]
    both = run_main(model_dir, scores, data, tmp_path / "both", "TARGET_SPEEDUP=1.5",
                    f"TARGET_PARAMS={budget}", *GRIDS)
    assert all(r["params"]["total"] <= budget and r["latency"]["speedup"] >= 1.5
               for r in both["results"])


@pytest.mark.parametrize("make_config", [olmo3_config, llama_config])
def test_measurement_is_positive_and_cached(make_config, tmp_path, monkeypatch):
    config = make_config()
    shapes = [{**common.shape_of(config), "num_hidden_layers": 2, "intermediate_size": 64}]
    configs = [config] + [prune.latency_config(config, s, set()) for s in shapes]
    work = latency.workload(config, **WORK)
    real, calls = latency.measure_latency, []
    monkeypatch.setattr(latency, "measure_latency", lambda *a: calls.append(a) or real(*a))
    cache = tmp_path / "latency.json"
    source, (cand,) = latency.measure_shapes(configs, "cpu", config.dtype, work, cache)
    assert len(calls) == 2
    for m in (source, cand):
        values = [*m["prefill_ms"].values(), *m["decode_ms"].values()]
        assert len(values) == 4 and all(math.isfinite(v) and v > 0 for v in values)
    again = latency.measure_shapes(configs, "cpu", config.dtype, work, cache)
    assert len(calls) == 2 and again == (source, [cand])  # the second search measures nothing
    assert json.loads(cache.read_text())["stage"] == "latency-cache"
    for bad in ("{}", "not json", '{"stage": "latency-cache", "entries": []}'):
        cache.write_text(bad)
        with pytest.raises(common.UserError,
                           match="latency.json is not a .*prune.py latency cache.*move it away"):
            latency.measure_shapes(configs, "cpu", config.dtype, work, cache)


def test_latency_target_errors_before_loading(yarn_olmo, tmp_path, monkeypatch):  # noqa: F811
    model_dir, scores, data = yarn_olmo
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(latency, "measure_latency", fake_latency)
    from test_safety import error
    out = tmp_path / "o"
    assert "no candidate on the grids reaches TARGET_SPEEDUP=100" in error(
        run_main, model_dir, scores, data, out, "TARGET_SPEEDUP=100", *GRIDS)
    assert "longer than MODEL's context (256)" in error(
        run_main, model_dir, scores, data, out, "TARGET_SPEEDUP=1.5", "_LATENCY_PROMPT=1000")
    assert "Pare runs on 'cpu' or 'cuda'" in error(
        run_main, model_dir, scores, data, out, "TARGET_SPEEDUP=1.5", "DEVICE=mps")
    assert "must be above 1" in error(run_main, model_dir, scores, data, out, "TARGET_SPEEDUP=0.9")
    assert "both set" in error(run_main, model_dir, scores, data, out, "TARGET_SPEEDUP=1.5",
                               "TARGET_FFN=64")
    assert not out.exists()
