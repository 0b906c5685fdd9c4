"""Distilling from a teacher cache vs from the live teacher on a real model: the cache's bytes per
token and write speed at several k, step time from the cache vs with the teacher, and held-out KL
(to the full teacher distribution) and perplexity after the same steps.

    uv run bench/bench_teacher_cache.py TEACHER STUDENT DATA_TXT OUT_DIR [STEPS] [K ...]

STUDENT: a prune.py output of TEACHER. Every run trains STEPS steps (default 100) of 4 x 128
tokens of DATA_TXT at LR 1e-4, the first 16 rows held out; each output is then evaluated against
the live teacher with the full vocabulary (the cached runs' own held-out KL is the bucketed one).
Prints one `key: value` line per run and a table.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import common  # noqa: E402
import distill  # noqa: E402

KS = (8, 32, 128)


def knobs(student, data, out, steps):
    return [f"STUDENT={student}", f"DATASET={data}", f"OUTPUT={out}", "EVAL_SAMPLES=16",
            "SEQ_LEN=128", "BATCH_SIZE=4", "GLOBAL_BATCH=4", f"MAX_STEPS={steps}", "LR=1e-4",
            "DEVICE=cpu"]


def main(teacher, student, data, out, steps=100, ks=KS):
    out = Path(out)
    distill._CHECKPOINT_EVERY, distill._EVAL_EVERY = 0, 10 ** 9  # held-out: at start and end
    tok = common.load_tokenizer(student)
    rows = common.calibration_rows(data, tok, 16, 128, distill._SEED)  # distill's held-out rows
    t_model = common.load_model(teacher, "cpu", torch.float32)
    full = {"start": common.evaluate(common.load_model(student, "cpu", torch.float32), rows, 4,
                                     t_model)}
    results = {}
    for k in (None, *ks):
        name = "live" if k is None else f"k{k}"
        extra = [] if k is None else [f"TEACHER_CACHE={out / f'cache-{name}'}", f"TOPK={k}"]
        t0 = time.time()
        s = distill.main(knobs(student, data, out / name, steps) + [f"TEACHER={teacher}", *extra])
        r = {"wall_s": time.time() - t0, "tokens_per_s": s["tokens_per_s"],
             "own_kl": s["final"]["kl"]}
        if k is not None:
            f = s["cache_filled"]
            r.update(bytes_per_token=f["bytes"] / f["tokens"], fill_tokens_per_s=f["tokens"] / f["seconds"])
        m = common.evaluate(common.load_model(str(out / name), "cpu", torch.float32), rows, 4, t_model)
        r.update(kl=m["kl"], ppl=m["student_ppl"], teacher_ppl=m["teacher_ppl"])
        results[name] = r
        for key, v in r.items():
            print(f"{name}_{key}: {v:.4f}")
    live = results["live"]["tokens_per_s"]
    print(f"\nstart: kl {full['start']['kl']:.4f}, ppl {full['start']['student_ppl']:.2f}, "
          f"teacher ppl {full['start']['teacher_ppl']:.2f} ({steps} steps each)")
    print(f"{'run':<6} {'kl':>7} {'ppl':>8} {'own kl':>7} {'B/token':>8} {'fill tok/s':>10} "
          f"{'step time / live':>16}")
    for name, r in results.items():
        print(f"{name:<6} {r['kl']:>7.4f} {r['ppl']:>8.2f} {r['own_kl']:>7.4f} "
              f"{r.get('bytes_per_token', 0):>8.1f} {r.get('fill_tokens_per_s', 0):>10.0f} "
              f"{live / r['tokens_per_s']:>16.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    args = sys.argv[1:]
    main(*args[:4], *([int(args[4])] if len(args) > 4 else []),
         *([tuple(int(a) for a in args[5:])] if len(args) > 5 else []))
