"""Off-policy KD vs on-policy (reverse KL) vs a 50/50 mix on a real model, for the same number
of optimizer steps and for the same training time: held-out KL to the teacher and perplexity,
and the share of step time spent sampling.

    uv run bench/bench_on_policy.py STUDENT DATA_TXT OUT_DIR [STEPS]

STUDENT: a prune.py output (its pare.json names the teacher). Every run: 4 rows x 128 tokens
per step of DATA_TXT at LR 1e-4, the first 16 rows held out; an on-policy row is the first 64
tokens of a document continued by the student. The equal-time runs get as many steps as fit in
the on-policy run's training time (measured here, one run after the other).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import distill  # noqa: E402


def train(student, data, out, steps, on_policy, divergence):
    distill._CHECKPOINT_EVERY, distill._EVAL_EVERY = 0, 10 ** 9  # held-out: at start and end
    s = distill.main([f"STUDENT={student}", f"DATASET={data}", f"OUTPUT={out}", "EVAL_SAMPLES=16",
                      "SEQ_LEN=128", "BATCH_SIZE=4", "GLOBAL_BATCH=4", f"MAX_STEPS={steps}",
                      "LR=1e-4", "DEVICE=cpu", f"ON_POLICY={on_policy}", f"DIVERGENCE={divergence}"])
    seconds = s["tokens"] / s["tokens_per_s"]  # training steps only (held-out evaluation apart)
    sampling = s["sampling"] or {"share_of_step_time": 0.0, "tokens_per_s": 0.0}
    return {"steps": steps, "kl": s["final"]["kl"], "ppl": s["final"]["student_ppl"],
            "start_kl": s["start"]["kl"], "start_ppl": s["start"]["student_ppl"],
            "teacher_ppl": s["start"]["teacher_ppl"], "train_s": seconds,
            "step_s": seconds / steps, "sampling_share": sampling["share_of_step_time"],
            "sampled_tokens_per_s": sampling["tokens_per_s"]}


def main(student, data, out, steps=50):
    out, r = Path(out), {}
    runs = {"off": (0.0, "forward_kl"), "on": (1.0, "reverse_kl"), "mix": (0.5, "reverse_kl")}
    for name, (lam, div) in runs.items():
        r[name] = train(student, data, out / name, steps, lam, div)
    budget = r["on"]["train_s"]
    for name in ("off", "mix"):  # as many steps as the on-policy run's training time allows
        n = max(steps, round(budget / r[name]["step_s"]))
        r[f"{name}_time"] = train(student, data, out / f"{name}_time", n, *runs[name])
    for name, v in r.items():
        for key, x in v.items():
            print(f"{name}_{key}: {x:.4f}")
    first = r["off"]
    print(f"\nstart: kl {first['start_kl']:.4f}, ppl {first['start_ppl']:.2f}, teacher ppl "
          f"{first['teacher_ppl']:.2f}; equal time = the on-policy run's {budget:.0f}s of training")
    print(f"{'run':<9} {'steps':>6} {'kl':>7} {'ppl':>8} {'train s':>8} {'s/step':>7} {'sampling':>8}")
    for name, v in r.items():
        print(f"{name:<9} {v['steps']:>6} {v['kl']:>7.4f} {v['ppl']:>8.2f} {v['train_s']:>8.0f} "
              f"{v['step_s']:>7.2f} {v['sampling_share']:>8.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:4], *([int(sys.argv[4])] if len(sys.argv) > 4 else []))
