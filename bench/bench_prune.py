"""Prune wall time against loading and saving the same checkpoint (target: prune <= 1.5x).

    uv run bench/bench_prune.py            # SmolLM2-135M if `uv sync --group real` made it, else
                                           # a random ~100M Olmo 3 built here

Timing does not depend on the score values, so the scores file is random with the model's real
shapes. Each prune run is prune.main() in-process with a minimal held-out set (1 row of 64
tokens); the import cost and a first warm-up run are paid outside the timings, each figure is
the best of two. "no-metrics" subtracts the held-out evaluation (teacher and pruned forward
passes), which load + save does not do: it is load + slice + build + save.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import prune  # noqa: E402

OUT = Path("out/bench")
TARGETS = {  # name: overrides, for SmolLM2 (hidden 576, 9 heads / 3 kv, ffn 1536, 30 layers)
    "smollm2": {"ffn": ["TARGET_FFN=1024"], "hidden+ffn": ["TARGET_HIDDEN=504", "TARGET_FFN=1024"],
                "layers": ["TARGET_LAYERS=24"], "heads": ["TARGET_HEADS=6"]},
    "olmo3": {"ffn": ["TARGET_FFN=1536"], "hidden+ffn": ["TARGET_HIDDEN=640", "TARGET_FFN=1536"],
              "layers": ["TARGET_LAYERS=10"], "mha->gqa": ["TARGET_KV_HEADS=4"]},
}


def random_olmo(path: Path, text: str) -> str:
    """A random Olmo 3 of ~100M parameters with a word-level tokenizer of `text` (built once)."""
    if (path / "config.json").is_file():
        return str(path)
    from transformers import AutoModelForCausalLM, Olmo3Config
    from bench_corpus import corpus_tokenizer
    config = Olmo3Config(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         layer_types=["sliding_attention"] * 3 + ["full_attention"],
                         sliding_window=512, pad_token_id=1, eos_token_id=0, bos_token_id=None)
    config.layer_types = config.layer_types * 3
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    corpus_tokenizer(text).save_pretrained(path)
    return str(path)


def fake_scores(model_dir: str, out: Path) -> str:
    config = common.load_config(model_dir)
    n, f, h, H = (config.num_hidden_layers, config.intermediate_size,
                  config.num_attention_heads, config.hidden_size)
    torch.save({"mlp": torch.rand(n, f), "attention": torch.rand(n, h), "attn_ln": torch.rand(H),
                "ffn_ln": torch.rand(H), "layer": {i: float(i) for i in range(n)},
                "layer_loss": {}, "base_loss": None,
                "meta": {"stage": "importance", "model": model_dir,
                         "fingerprint": common.fingerprint(model_dir), "config": {}, "recipe": {},
                         "num_samples": 0, "loss_samples": 0, "gram": None,
                         "shape": {**common.shape_of(config), "vocab_size": config.vocab_size}}},
               out)
    return str(out)


def main():
    import bench_smollm2
    from bench_corpus import write_corpus
    OUT.mkdir(parents=True, exist_ok=True)
    _, eval_txt = write_corpus(OUT / "corpus")
    kind = "smollm2" if bench_smollm2.available() else "olmo3"
    model_dir = (bench_smollm2.smollm2_dir() if kind == "smollm2"
                 else random_olmo(OUT / "olmo3-100m", Path(eval_txt).read_text()))
    scores = fake_scores(model_dir, OUT / "scores.pt")
    config = common.load_config(model_dir)
    n = common.param_count(common.shape_of(config), config)["total"]
    print(f"model: {kind} {model_dir} ({prune.fmt_params(n)})")

    def load_save():
        t0 = time.perf_counter()
        model = common.load_model(model_dir, "cpu", torch.float32)
        common.write_checkpoint(model, model_dir, OUT / "copy", {"stage": "copy"})
        return time.perf_counter() - t0

    base = min(load_save() for _ in range(2))
    print(f"load_save_s: {base:.2f}")
    def prune_once(args):
        t0 = time.perf_counter()
        res = prune.main([f"MODEL={model_dir}", f"SCORES={scores}", f"DATASET={eval_txt}",
                          "NUM_SAMPLES=1", "SEQ_LEN=64", "DEVICE=cpu", f"OUTPUT={OUT / 'pruned'}",
                          *args])
        total = time.perf_counter() - t0
        return total, total - res["time"]["eval"]

    prune_once(next(iter(TARGETS[kind].values())))  # warm-up: first forward pass, page cache
    rows = []
    for name, args in TARGETS[kind].items():
        runs = [prune_once(args) for _ in range(2)]
        rows.append((name, min(r[0] for r in runs), min(r[1] for r in runs)))
    print(f"{'target':<12} {'prune s':>8} {'no-metrics s':>13} {'load+save s':>12} "
          f"{'ratio':>6} {'ratio no-metrics':>17}")
    for name, t, core in rows:
        print(f"{name:<12} {t:8.2f} {core:13.2f} {base:12.2f} {t / base:6.2f} {core / base:17.2f}")
    for name, t, core in rows:
        print(f"ratio_{name}: {t / base:.2f}")
        print(f"ratio_no_metrics_{name}: {core / base:.2f}")

if __name__ == "__main__":
    main()
