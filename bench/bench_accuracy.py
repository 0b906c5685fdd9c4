"""Pare's proxies next to downstream accuracy, on a real model (CPU-sized).

    uv run bench/bench_accuracy.py SCORES DATA_TXT OUT_DIR [STEPS] [LIMIT]

SCORES: importance_analysis.py's output for the source model (with its repair statistics).
1. Two pruned shapes (hidden 504 + 6 of 9 heads; MLP 1536 -> 768 on SmolLM2) and their distilled
   versions next to the source, on evaluate.py's default suite (LIMIT documents a task), with
   standard errors.
2. A TARGET_PARAMS search at 3/4 of the source's parameters: its 3 best candidates by zero-shot
   KL, each distilled STEPS steps; the ranks by zero-shot KL, by KL after and by accuracy after
   (distill.py's in-loop suite), and Kendall's tau between them.
3. Off-policy vs on-policy (ON_POLICY=1.0, reverse KL) from the first shape, for the same steps:
   held-out KL and the in-loop accuracy.
Every distillation: 4 rows x 128 tokens per step of DATA_TXT, LR 1e-4, 16 rows held out.
The cheap parts first (distill.py's in-loop suite), evaluate.py's suite last. Results go to
OUT_DIR/accuracy.json as each part finishes; a rerun reads the outputs already written.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import distill  # noqa: E402
import evaluate  # noqa: E402
import prune  # noqa: E402
from selection import kendall_tau  # noqa: E402

SHAPES = {"w504h6": ["TARGET_HIDDEN=504", "TARGET_HEADS=6"], "ffn768": ["TARGET_FFN=768"]}
IN_LOOP_DOCS = 50  # distill's _EVAL_TASK_DOCS (its suite: arc_easy, piqa, mmlu)


def stderr_of_mean(acc: dict, n: int) -> float:
    """Standard error of the mean accuracy of tasks scored on n documents each (percent)."""
    se = [math.sqrt(p / 100 * (1 - p / 100) / (n - 1)) * 100 for p in acc.values()]
    return math.sqrt(sum(s * s for s in se)) / len(se)


def do_prune(scores, data, out, *args):
    if (Path(out) / "pare.json").exists():  # written by an earlier run of this bench
        return common.read_record(out)["metrics"]["kl"]
    prune._EVAL_TASKS = []  # accuracy comes from evaluate.py and distill.py's first evaluation
    return prune.main([f"SCORES={scores}", f"DATASET={data}", "NUM_SAMPLES=8", "SEQ_LEN=256",
                       f"OUTPUT={out}", *args])["results"][0]["metrics"]["kl"]


def do_distill(student, data, out, steps, *args):
    if (Path(out) / "pare.json").exists():
        s = common.read_record(out)["distill"]["metrics"]
        return summary(s["start"], s["final"])
    distill._CHECKPOINT_EVERY, distill._EVAL_EVERY = 0, 10 ** 9  # held-out: at start and end
    s = distill.main([f"STUDENT={student}", f"DATASET={data}", f"OUTPUT={out}", "EVAL_SAMPLES=16",
                      "SEQ_LEN=128", "BATCH_SIZE=4", "GLOBAL_BATCH=4", f"MAX_STEPS={steps}",
                      "LR=1e-4", "DEVICE=cpu", *args])
    return summary(s["start"], s["final"])


def summary(start: dict, final: dict) -> dict:
    return {"start_kl": start["kl"], "kl": final["kl"], "ppl": final["student_ppl"],
            "start_acc": start["accuracy"], "acc": final["accuracy"],
            "acc_se": stderr_of_mean(final["downstream"], IN_LOOP_DOCS),
            "start_downstream": start["downstream"], "downstream": final["downstream"]}


def do_evaluate(model, out, limit):
    r = (json.loads(Path(out).read_text()) if Path(out).exists() else
         evaluate.main([f"MODEL={model}", f"LIMIT={limit}", "DEVICE=cpu", f"OUTPUT={out}"]))
    mean = sum(t["primary"] for t in r["tasks"].values()) / len(r["tasks"])
    se = math.sqrt(sum(t["stderr"] ** 2 for t in r["tasks"].values())) / len(r["tasks"])
    row = {"mean": mean, "se": se, **{k: (t["primary"], t["stderr"]) for k, t in r["tasks"].items()}}
    if r["teacher_tasks"]:
        row["teacher"] = sum(t["primary"] for t in r["teacher_tasks"].values()) / len(r["tasks"])
    return row


def main(scores, data, out, steps=60, limit=20):
    out, results = Path(out), {}

    def save():
        (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")

    out.mkdir(parents=True, exist_ok=True)
    # 1. two shapes, pruned and distilled (in-loop accuracy)
    for name, args in SHAPES.items():
        results[name] = {"pruned_kl": do_prune(scores, data, out / name, *args),
                         "distill": do_distill(out / name, data, out / f"{name}-distilled", steps)}
        save()
    # 2. a budget search: zero-shot KL ranking vs accuracy after a short distillation
    src = common.load_config(common.read_record(out / "ffn768")["source_model"])
    budget = 0.75 * common.param_count(common.shape_of(src), src)["total"]
    do_prune(scores, data, out / "budget", f"TARGET_PARAMS={budget:.0f}", "SAVE_TOP=3")
    cands = []
    for rank in (1, 2, 3):
        path = out / ("budget" if rank == 1 else f"budget-{rank}")
        record = common.read_record(path)
        d = do_distill(path, data, out / f"{path.name}-distilled", steps)
        cands.append({"shape": {k: record["shape"][k] for k in ("hidden_size", "intermediate_size")},
                      "zero_shot_kl": record["metrics"]["kl"], **d})
    zs, kl, acc = ([c[k] for c in cands] for k in ("zero_shot_kl", "kl", "acc"))
    results["search"] = {"budget": budget, "candidates": cands,
                         "tau_zero_shot_kl_vs_acc": kendall_tau([-x for x in zs], acc),
                         "tau_kl_after_vs_acc": kendall_tau([-x for x in kl], acc),
                         "tau_zero_shot_vs_kl_after": kendall_tau(zs, kl)}
    save()
    # 3. off- vs on-policy, from the first shape
    first = next(iter(SHAPES))
    results["policy"] = {"off": results[first]["distill"]}
    for name, lam in (("on", 1.0),):
        results["policy"][name] = do_distill(out / first, data, out / f"{first}-{name}", steps,
                                             f"ON_POLICY={lam}", "DIVERGENCE=reverse_kl")
        save()
    # 4. evaluate.py's suite: the source (as the teacher), both shapes pruned and distilled
    for name in SHAPES:
        for kind, path in (("pruned", out / name), ("distilled", out / f"{name}-distilled")):
            results[name][kind] = do_evaluate(path, out / f"{path.name}-eval.json", limit)
            save()

    print(f"\n{'model':<22} {'KL':>7} {'acc (7 tasks)':>15}")
    for name in SHAPES:
        r = results[name]
        print(f"{name:<22} {r['pruned_kl']:>7.4f} {r['pruned']['mean']:>9.2f} ± {r['pruned']['se']:.2f}")
        print(f"{name + ' distilled':<22} {r['distill']['kl']:>7.4f} "
              f"{r['distilled']['mean']:>9.2f} ± {r['distilled']['se']:.2f}")
    print(f"source: {results[first]['pruned'].get('teacher', float('nan')):.2f}")
    print(f"\nsearch ({budget / 1e6:.1f}M): zero-shot KL, KL after {steps} steps, in-loop accuracy")
    for c in cands:
        print(f"  {c['shape']}: {c['zero_shot_kl']:.4f} {c['kl']:.4f} {c['acc']:.2f} ± {c['acc_se']:.2f}")
    s = results["search"]
    print(f"tau(zero-shot KL, acc) {s['tau_zero_shot_kl_vs_acc']}, tau(KL after, acc) "
          f"{s['tau_kl_after_vs_acc']}, tau(zero-shot KL, KL after) {s['tau_zero_shot_vs_kl_after']}")
    print("\npolicy: KL after, accuracy after (in-loop suite)")
    for name, r in results["policy"].items():
        print(f"  {name:<4} {r['kl']:.4f} {r['acc']:.2f} ± {r['acc_se']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:4], *(int(a) for a in sys.argv[4:6]))
