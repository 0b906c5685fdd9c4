"""The whole pipeline at Olmo-3-7B shape on one GPU, from nothing but this repository and uv.

    uv run bench/gpu.py                 # on a CUDA machine: 7B teacher -> ~4.2B student
    uv run bench/gpu.py --tiny          # the same steps at a tiny shape on a CPU (the tests run it)

Builds a random-weight Olmo 3 with Olmo-3-7B-Instruct's config values (../shared/notes/olmo3.md;
timing and memory do not depend on the weights) and a word-level tokenizer over synthetic text,
then runs the three stages as a user would (their main()): importance over NUM_SAMPLES x 4096
tokens, prune to hidden 3072 / ffn 8192 / 24 heads (~4.2B), and DISTILL_STEPS distillation
steps. After each stage it prints one `stage: ...` line (wall time, tokens/s, peak GPU memory;
for distill also TFLOP/s per device and MFU) and appends it to OUT/gpu.json, so a run killed
part-way still leaves what it measured. Goals (issue): importance over 1024 x 4096 tokens of a
7B model in <= 3 min on one H200; distillation 7B -> ~4B at >= 40% MFU; the whole script < 8 min.
"""

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

import common  # noqa: E402

OUT = Path(os.environ.get("PARE_GPU_OUT", "out/gpu"))   # where models, data and gpu.json go
NUM_SAMPLES = 256          # importance rows of SEQ_LEN (the goal is 1024: scale the time by 4)
SEQ_LEN = 4096
DISTILL_STEPS = 20
GLOBAL_BATCH = 16          # distill rows per step (65k tokens)
OLMO3_7B = dict(vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=65536,
                rope_theta=500000.0, rms_norm_eps=1e-6, sliding_window=4096,
                rope_scaling={"rope_type": "yarn", "factor": 8.0,
                              "original_max_position_embeddings": 8192},
                layer_types=["sliding_attention"] * 3 + ["full_attention"], tie_word_embeddings=False,
                pad_token_id=100277, eos_token_id=100257, bos_token_id=None)
TARGET = ["TARGET_HIDDEN=3072", "TARGET_FFN=8192", "TARGET_HEADS=24"]
TINY = dict(OLMO3_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, sliding_window=16,
            max_position_embeddings=512, pad_token_id=1, eos_token_id=0,
            rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64})
TINY_RUN = dict(NUM_SAMPLES=8, SEQ_LEN=32, DISTILL_STEPS=2, GLOBAL_BATCH=4,
                TARGET=["TARGET_HIDDEN=48", "TARGET_FFN=96", "TARGET_HEADS=3"])


def tokenizer(vocab_size: int):
    """A word-level tokenizer whose words are w0, w1, ... (ids 2..), eos 0 / pad 1 (or Olmo's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size)}
    eos, pad = ("w100257", "w100277") if vocab_size == OLMO3_7B["vocab_size"] else ("w0", "w1")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token="w2")


def write_data(path: Path, vocab_size: int, tokens: int):
    """Synthetic documents of random words (Zipf-like), about `tokens` tokens in all."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3, vocab_size - 300)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(words))))
    with open(path, "w") as f:
        while tokens > 0:
            n = rng.randint(200, 2000)
            f.write(" ".join(rng.choices(words, cum_weights=cum, k=n)) + "\n\n")
            tokens -= n + 1


def build_teacher(path: Path, config_values: dict, device: str) -> str:
    """A random Olmo 3 of `config_values`, initialised on `device` in bf16 (fp32 on CPU), saved."""
    from transformers import AutoModelForCausalLM, Olmo3Config
    values = dict(config_values)  # the 3 sliding + 1 full pattern repeated over all layers
    values["layer_types"] = values["layer_types"] * (values["num_hidden_layers"] // 4)
    config = Olmo3Config(**values)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer(config.vocab_size).save_pretrained(path)
    del model
    return str(path)


def sig(x: float) -> float:
    """`x` to 4 significant digits (tiny shapes take milliseconds: never round them to 0)."""
    return float(f"{x:.4g}")


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def report(name: str, seconds: float, tokens: int, **extra):
    """One `stage:` line, also appended to OUT/gpu.json (partial results survive a kill)."""
    row = {"stage": name, "seconds": sig(seconds), "tokens": tokens,
           "tokens_per_s": sig(tokens / seconds) if seconds else None,
           "peak_gpu_gib": sig(peak_gib()), **extra}
    print(f"stage: {json.dumps(row)}", flush=True)
    log = OUT / "gpu.json"
    rows = json.loads(log.read_text()) if log.exists() else []
    log.write_text(json.dumps(rows + [row], indent=1))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str]) -> list[dict]:
    import distill
    import importance_analysis
    import prune
    tiny = "--tiny" in argv
    run = TINY_RUN if tiny else dict(NUM_SAMPLES=NUM_SAMPLES, SEQ_LEN=SEQ_LEN, TARGET=TARGET,
                                     DISTILL_STEPS=DISTILL_STEPS, GLOBAL_BATCH=GLOBAL_BATCH)
    values = TINY if tiny else OLMO3_7B
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
          f"shape {'tiny' if tiny else 'Olmo-3-7B'}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    common.remove(OUT / "gpu.json")
    t0 = time.time()
    teacher = build_teacher(OUT / "teacher", values, device)
    data = OUT / "data.txt"
    seq = run["SEQ_LEN"]
    write_data(data, values["vocab_size"], (run["NUM_SAMPLES"] + 16 + run["GLOBAL_BATCH"]
                                            * (run["DISTILL_STEPS"] + 2)) * seq)
    report("build", time.time() - t0, 0)

    t0 = time.time()
    scores = importance_analysis.main([f"MODEL={teacher}", f"DATASET={data}", f"SEQ_LEN={seq}",
                                       f"NUM_SAMPLES={run['NUM_SAMPLES']}", "BATCH_SIZE=8",
                                       f"OUTPUT={OUT / 'scores.pt'}"])
    t = scores["time"]
    report("importance", time.time() - t0, run["NUM_SAMPLES"] * seq, load_s=sig(t["load"]),
           scoring_pass_s=sig(t["scores"]), skip_loss_s=sig(t["skip_loss"]),
           scoring_tokens_per_s=sig(run["NUM_SAMPLES"] * seq / t["scores"]))

    t0 = time.time()
    pruned = prune.main([f"SCORES={OUT / 'scores.pt'}", f"DATASET={data}", f"SEQ_LEN={seq}",
                         "NUM_SAMPLES=4", *run["TARGET"], f"OUTPUT={OUT / 'pruned'}"])
    report("prune", time.time() - t0, 4 * seq, params=pruned["results"][0]["params"]["total"],
           **{k: sig(v) for k, v in pruned["time"].items()})

    t0 = time.time()
    saved = (distill._CHECKPOINT_EVERY, distill._EVAL_EVERY)
    distill._CHECKPOINT_EVERY, distill._EVAL_EVERY = 0, 10**9
    try:
        s = distill.main([f"STUDENT={OUT / 'pruned'}", f"DATASET={data}", f"SEQ_LEN={seq}",
                          "BATCH_SIZE=4", f"GLOBAL_BATCH={run['GLOBAL_BATCH']}", "EVAL_SAMPLES=2",
                          f"MAX_STEPS={run['DISTILL_STEPS']}", "GRADIENT_CHECKPOINTING=True",
                          f"OUTPUT={OUT / 'distilled'}"])
    finally:
        distill._CHECKPOINT_EVERY, distill._EVAL_EVERY = saved
    report("distill", time.time() - t0, s["tokens"], train_tokens_per_s=sig(s["tokens_per_s"]),
           tflops_per_device=sig(s["tflops_per_device"]), mfu=s["mfu"])
    return json.loads((OUT / "gpu.json").read_text())


if __name__ == "__main__":
    common.run(main)
