"""distill.py's logit loss on a 100k-vocabulary model: peak memory and step time, one run.

    uv run bench/bench_distill.py

1. Memory. The logit loss alone, forward + backward, for TOKENS tokens of an Olmo-3-sized
   vocabulary (100278) at width HIDDEN: `chunked` (distill.py's ChunkedDistillLoss, CHUNK
   tokens at a time) vs `full` (full float32 logits of both models and plain autograd, what a
   straightforward KD loss does). Each variant runs in its own fresh process: on a GPU the
   figure is torch.cuda.max_memory_allocated above what was allocated before the loss; on a CPU
   (torch keeps no CPU allocator statistics) it is the process's peak resident set size
   (getrusage ru_maxrss) above the resident size just before the loss. Large tensors are mmap'd
   by the allocator and returned on free, so RSS follows live tensors closely. Target <= 1/4.
   Two token counts show the scaling: full grows with tokens, chunked does not.
2. Time. One training step's work on the same batch (BATCH x SEQ_LEN tokens) with a teacher
   and a width-pruned student of the same 100k vocabulary: `distill` (teacher forward without
   lm_head, then distill.py's Distiller: student forward + chunked KL with both lm_heads + backward)
   vs `baseline` (teacher forward with its logits + student forward/backward with transformers'
   own cross-entropy). Median of REPEATS after a warm-up, alternating. Target <= 1.10x.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

VOCAB = 100_278          # Olmo 3's vocabulary
HIDDEN = 256             # width of the hidden states entering lm_head (memory part)
TOKENS = (1024, 2048)    # tokens per loss call (memory part)
CHUNK = 512              # distill.py CHUNK_TOKENS, both parts
BATCH, SEQ_LEN = 2, 512  # time part: rows x tokens
REPEATS = 3              # timed steps per variant (median)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(variant: str, tokens: int) -> dict:
    """Peak extra memory (bytes) of one loss forward + backward, in this fresh process."""
    import torch
    import distill
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device) * 0.05  # noqa: E731
    h_s, w_s = mk(tokens, HIDDEN).requires_grad_(), mk(VOCAB, HIDDEN).requires_grad_()
    h_t, w_t = mk(tokens, HIDDEN), mk(VOCAB, HIDDEN)
    y = torch.randint(0, VOCAB, (tokens,), generator=g, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    if variant == "chunked":
        loss, _ = distill.logit_loss(h_s, w_s, ("logits", h_t, w_t), y, chunk=CHUNK)
    else:
        loss = distill.direct_logit_loss(h_s, w_s, h_t, w_t, y)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "tokens": tokens, "peak": peak, "loss": loss.item(),
            "device": device}


def models(device):
    """A teacher (hidden 512, ffn 1536, 4 layers) and a width-pruned student (ffn 1024)."""
    import torch
    from transformers import AutoModelForCausalLM, Olmo3Config
    kw = dict(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(Olmo3Config(intermediate_size=1536, **kw))
    student = AutoModelForCausalLM.from_config(Olmo3Config(intermediate_size=1024, **kw))
    return teacher.to(device).eval().requires_grad_(False), student.to(device).train()


def timing() -> dict:
    import torch
    import distill
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, student = models(device)
    settings = distill.LossSettings(temperature=1.0, kl_weight=1.0, ce_weight=0.0, chunk=CHUNK)
    kd = distill.Distiller(student, torch.nn.Identity(), [], settings)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def distill_step():
        with torch.no_grad(), autocast:
            t = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        with autocast:
            loss, *_ = kd(ids, ("logits", t[:, :-1].flatten(0, 1), teacher.lm_head.weight), {})
        loss.backward()

    def baseline_step():
        with torch.no_grad(), autocast:
            teacher(input_ids=ids, use_cache=False).logits.sum().item()
        with autocast:
            loss = student(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    steps = {"distill": distill_step, "baseline": baseline_step}
    times = {k: [] for k in steps}
    for k in steps:  # warm-up
        steps[k]()
    for _ in range(REPEATS):
        for k, fn in steps.items():
            student.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {"device": device,
                                                                    "threads": torch.get_num_threads()}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    print(f"memory: logit loss fwd+bwd, vocab {VOCAB}, hidden {HIDDEN}, chunk {CHUNK}")
    ratios = []
    for tokens in TOKENS:
        full, chunked = child(["full", str(tokens)]), child(["chunked", str(tokens)])
        ratio = chunked["peak"] / full["peak"]
        ratios.append(ratio)
        print(f"  tokens {tokens:>6} | full {full['peak'] / 2**20:8.0f} MiB | chunked "
              f"{chunked['peak'] / 2**20:8.0f} MiB | ratio {ratio:.3f} | losses "
              f"{full['loss']:.6f} {chunked['loss']:.6f} | {full['device']}")
    t = child(["time"])
    print(f"time: {BATCH}x{SEQ_LEN} tokens, vocab {VOCAB}, chunk {CHUNK}, {t['device']} "
          f"({t['threads']} threads), median of {REPEATS}")
    print(f"  distill step {t['distill']:.3f}s | teacher fwd + student fwd/bwd CE "
          f"{t['baseline']:.3f}s")
    print(f"memory_ratio: {ratios[-1]:.3f}")
    print(f"time_ratio: {t['distill'] / t['baseline']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        main()
    elif sys.argv[1] == "time":
        print(json.dumps(timing()))
    else:
        print(json.dumps(memory(sys.argv[1], int(sys.argv[2]))))
