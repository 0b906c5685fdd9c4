"""evaluate.py's accuracy against a straightforward independent computation, on a real model.

    uv sync --group real && uv run bench/bench_evaluate.py [LIMIT=10]

Model: SmolLM2-135M-Instruct (bench_smollm2.py). For the first LIMIT documents of each default
task, evaluate.main scores them (batched, length-sorted, padded, logits only at the
continuation); the check here runs every (context, continuation) alone through the whole model,
takes the full logits' log-softmax at the continuation's positions, and picks the answer by the
task's primary metric in its own code. Prints both accuracies per task and whether they agree.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import benchmarks  # noqa: E402
import common  # noqa: E402
import evaluate  # noqa: E402
from bench_smollm2 import smollm2_dir  # noqa: E402


def independent(model, tok, docs: list, metric: str) -> float:
    """Accuracy by whole forwards, one (context, continuation) at a time."""
    hits = 0
    for doc in docs:
        best, best_score = None, -float("inf")
        for k, (context, continuation) in enumerate(doc["choices"]):
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            full = tok(context + continuation, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
            total = float(sum(logp[i - 1, full[i]] for i in range(n_ctx, len(full))))
            if metric == "acc_per_char":
                total /= len(continuation)
            elif metric == "acc_per_token":
                total /= max(1, len(full) - n_ctx)
            if total > best_score:
                best, best_score = k, total
        hits += best == doc["label"]
    return 100 * hits / len(docs)


def main():
    limit = int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("LIMIT=")), 10))
    model_dir = smollm2_dir()
    out = Path("out/bench/evaluate")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    got = evaluate.main([f"MODEL={model_dir}", f"LIMIT={limit}", "BATCH_SIZE=8", "DEVICE=cpu",
                         f"OUTPUT={out / 'smollm2.json'}"])["tasks"]
    t_eval = time.time() - t0
    model = common.load_model(model_dir, "cpu", torch.float32)
    tok = common.load_tokenizer(model_dir)
    suite = benchmarks.suite_of(evaluate.TASKS, limit)
    t0 = time.time()
    rows = []
    for spec, (fmt, metric, docs) in suite.items():
        want = independent(model, tok, docs, metric)
        rows.append((spec, fmt, metric, len(docs), got[spec]["primary"], want))
    t_ind = time.time() - t0
    print(f"{'task':<16} {'format':<9} {'metric':<13} {'docs':>5} {'evaluate.py':>12} "
          f"{'independent':>12}  agree")
    for spec, fmt, metric, n, a, b in rows:
        print(f"{spec:<16} {fmt:<9} {metric:<13} {n:>5} {a:>12.2f} {b:>12.2f}  {abs(a - b) < 1e-9}")
    print(f"agree: {all(abs(a - b) < 1e-9 for *_, a, b in rows)}")
    print(f"time_ratio: {t_eval / t_ind:.3f} (evaluate.py incl. loading / independent whole forwards)")
    print(json.dumps({spec: [a, b] for spec, _, _, _, a, b in rows}))


if __name__ == "__main__":
    main()
