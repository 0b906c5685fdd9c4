"""Latency-aware pruning on a real model: prune.py's measured speed-ups against an independent
generate() timing of the checkpoints it writes, the search time with and without the cache, and
the parameter-only choice of the same size for comparison, and the ranking without the repair
(REPAIR=False on the same cached timings: does the repair move the chosen shape?).

    uv run bench/bench_latency.py MODEL_DIR SCORES EVAL_TXT OUT_DIR [TARGET_SPEEDUP]

prune.py runs in-process with TARGET_SPEEDUP (default 1.5), SAVE_TOP=3 and the recipe overrides
in RECIPE (a CPU-sized workload and grids; on a GPU drop them), twice: the second search finds
every measurement in the cache. Then, for the source and each written checkpoint (and the
width-only TARGET_PARAMS choice with the winner's parameter count), decode time per token at
batch 1 from generate(): (time of N new tokens - time of 1) / (N - 1), the median of REPEATS.
Prints `key: value` lines and a table; the ratio column is prune's speed-up / generate's.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import common  # noqa: E402
import prune  # noqa: E402

RECIPE = {"_LATENCY_PROMPT": 64, "_LATENCY_NEW_TOKENS": 16, "_LATENCY_BATCHES": (1, 4),
          "_LATENCY_WARMUP": 1, "_LATENCY_REPEATS": 3, "_GRID_STEPS": 4, "_NUM_CANDIDATES": 4,
          "_DEPTH_METRIC": "loss", "_BUDGET_TOLERANCE": 0.15}
EVAL_ARGS = ["NUM_SAMPLES=4", "SEQ_LEN=256"]
NEW_TOKENS, REPEATS = 33, 3


def run_prune(args: list[str]) -> tuple[dict, float]:
    old = {k: getattr(prune, k) for k in RECIPE}
    for k, v in RECIPE.items():
        setattr(prune, k, v)
    try:
        t0 = time.time()
        return prune.main(args), time.time() - t0
    finally:
        for k, v in old.items():
            setattr(prune, k, v)


def generate_decode_ms(path: str, prompt: int) -> float:
    """Decode ms/token at batch 1 from generate() (greedy, exactly N tokens, KV cache on)."""
    model = common.load_model(path, "cpu", torch.float32)
    ids = torch.randint(model.config.vocab_size, (1, prompt))

    def gen(n):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                       pad_token_id=0)
        return time.perf_counter() - t0
    gen(NEW_TOKENS)  # warm-up
    return 1e3 * statistics.median((gen(NEW_TOKENS) - gen(1)) / (NEW_TOKENS - 1)
                                   for _ in range(REPEATS))


def main(model, scores, eval_txt, out_dir, target="1.5"):
    out = Path(out_dir)
    base = [f"MODEL={model}", f"SCORES={scores}", f"DATASET={eval_txt}", *EVAL_ARGS]
    cache = out / "latency.json"
    if cache.exists():
        cache.unlink()
    first, t_cold = run_prune(base + [f"TARGET_SPEEDUP={target}", "SAVE_TOP=3",
                                      f"OUTPUT={out / 'fast'}"])
    again, t_warm = run_prune(base + [f"TARGET_SPEEDUP={target}", "SAVE_TOP=3",
                                      f"OUTPUT={out / 'fast'}"])
    print(f"search_time_cold_s: {t_cold:.1f}")
    print(f"search_time_cached_s: {t_warm:.1f} ({t_warm / t_cold:.2f}x)")
    plain, _ = run_prune(base + [f"TARGET_SPEEDUP={target}", "REPAIR=False",
                                 f"OUTPUT={out / 'fast-norepair'}"])  # the same timings, cached
    for name, res in (("repair", first), ("no_repair", plain)):  # does the repair move the choice?
        print(f"ranking_{name}: " + "; ".join(
            f"hidden {r['shape']['hidden_size']} ffn {r['shape']['intermediate_size']} heads "
            f"{r['shape']['num_attention_heads']} layers {r['shape']['num_hidden_layers']}: "
            f"{r['latency']['speedup']:.2f}x KL {r['metrics']['kl']:.4f}" for r in res["results"]))
    win = first["results"][0]
    try:  # the parameter-only choice (width only, the budget search's default) of that size
        width, _ = run_prune(base + [f"TARGET_PARAMS={win['params']['total']}",
                                     f"OUTPUT={out / 'params-only'}"])
    except common.UserError as e:
        print(f"params-only: {e}")
        width = None
    src_ms = generate_decode_ms(model, RECIPE["_LATENCY_PROMPT"])
    rows = []
    for path, res in zip(first["written"], first["results"]):
        ms = generate_decode_ms(str(path), RECIPE["_LATENCY_PROMPT"])
        rows.append((path.name, res["shape"], res["params"]["total"], res["latency"]["speedup"],
                     src_ms / ms, res["metrics"]["student_ppl"]))
    if width:
        w = width["results"][0]
        ms = generate_decode_ms(str(width["written"][0]), RECIPE["_LATENCY_PROMPT"])
        rows.append(("params-only", w["shape"], w["params"]["total"], None, src_ms / ms,
                     w["metrics"]["student_ppl"]))
    print(f"source_decode_ms_generate: {src_ms:.3f}")
    print(f"{'output':<12} {'hidden':>6} {'ffn':>5} {'heads':>5} {'layers':>6} {'params':>9} "
          f"{'prune':>7} {'generate':>8} {'ratio':>6} {'ppl':>8}")
    for name, s, p, sp, gp, ppl in rows:
        print(f"{name:<12} {s['hidden_size']:>6} {s['intermediate_size']:>5} "
              f"{s['num_attention_heads']:>5} {s['num_hidden_layers']:>6} {p / 1e6:>8.2f}M "
              f"{'-' if sp is None else f'{sp:.2f}x':>7} {gp:>7.2f}x "
              f"{'-' if sp is None else f'{sp / gp:.3f}':>6} {ppl:>8.2f}")
        if sp is not None:
            print(f"ratio_{name}: {sp / gp:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
