"""Importance vs random on a real model: held-out perplexity of the teacher, of Pare's pruned
model, and of the same shape with random units kept (the scores file with every score replaced by
random numbers, pruned by the same code).

    uv run bench/bench_real_prune.py MODEL SCORES EVAL_TXT OUT_DIR [SHAPE ...] [--no-random]

SHAPE names are keys of SHAPES (default: all); `--no-random` skips the random baselines. Prints
one `key: value` line per run and a table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import prune  # noqa: E402

SHAPES = {  # name: (knob overrides, prune.py recipe constants set for the run)
    "ffn1024": (["TARGET_FFN=1024"], {}),
    "h504_ffn1024": (["TARGET_HIDDEN=504", "TARGET_FFN=1024"], {}),
    "h504_ffn1024_nocorr": (["TARGET_HIDDEN=504", "TARGET_FFN=1024"], {"_NORM_CORRECTION": False}),
    "layers24_bi": (["TARGET_LAYERS=24"], {"_DEPTH_METRIC": "bi"}),
    "layers24_loss": (["TARGET_LAYERS=24"], {"_DEPTH_METRIC": "loss"}),
    "layers24_block": (["TARGET_LAYERS=24"], {"_DEPTH_METRIC": "block"}),
    "heads6": (["TARGET_HEADS=6"], {}),
    "heads6_output": (["TARGET_HEADS=6"], {"_HEAD_SCORE": "output"}),
    # the repair on the activation ranking's neurons (not the ones it compensates best)
    "ffn1024_byscore": (["TARGET_FFN=1024"], {"_REPAIR_SELECT": False}),
    "h504_ffn1024_byscore": (["TARGET_HIDDEN=504", "TARGET_FFN=1024"], {"_REPAIR_SELECT": False}),
    # the same shapes without the least-squares repair (REPAIR=False: slicing only)
    "ffn1024_norepair": (["TARGET_FFN=1024", "REPAIR=False"], {}),
    "h504_ffn1024_norepair": (["TARGET_HIDDEN=504", "TARGET_FFN=1024", "REPAIR=False"], {}),
    "heads6_norepair": (["TARGET_HEADS=6", "REPAIR=False"], {}),
    "layers24_block_norepair": (["TARGET_LAYERS=24", "REPAIR=False"], {"_DEPTH_METRIC": "block"}),
    # depth with and without the depth repair (block: also without its repaired re-ranking)
    "layers24_block_norerank": (["TARGET_LAYERS=24"], {"_DEPTH_METRIC": "block", "_DEPTH_RERANK": 0}),
    "layers24_bi_norepair": (["TARGET_LAYERS=24", "REPAIR=False"], {"_DEPTH_METRIC": "bi"}),
    "layers21_block": (["TARGET_LAYERS=21"], {"_DEPTH_METRIC": "block"}),
    "layers21_block_norerank": (["TARGET_LAYERS=21"], {"_DEPTH_METRIC": "block", "_DEPTH_RERANK": 0}),
    "layers21_block_norepair": (["TARGET_LAYERS=21", "REPAIR=False"], {"_DEPTH_METRIC": "block"}),
    "layers21_bi": (["TARGET_LAYERS=21"], {"_DEPTH_METRIC": "bi"}),
    "layers21_bi_norepair": (["TARGET_LAYERS=21", "REPAIR=False"], {"_DEPTH_METRIC": "bi"}),
    # heads by the repair's surgeon (heads6) vs by their activation, both refit
    "heads6_byscore": (["TARGET_HEADS=6"], {"_REPAIR_SELECT": False}),
}
ACCURACY = ("layers24_block", "layers24_block_norepair", "layers21_block", "layers21_block_norepair",
            "heads6", "heads6_byscore")  # prune.py's downstream suite runs for these only
RANDOM_SEEDS = (0, 1)  # random-kept baselines per shape
EVAL_ARGS = ["NUM_SAMPLES=16", "SEQ_LEN=256"]


def with_recipe(constants: dict, fn, *args):
    """fn(*args) with some of prune.py's recipe constants set (restored afterwards)."""
    old = {k: getattr(prune, k) for k in constants}
    for k, v in constants.items():
        setattr(prune, k, v)
    try:
        return fn(*args)
    finally:
        for k, v in old.items():
            setattr(prune, k, v)


def random_scores(path: str, seed: int, out: str) -> str:
    """The scores file with every score replaced by uniform random numbers (meta kept)."""
    s = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for key in ("mlp", "attention", "attn_ln", "ffn_ln"):
        s[key] = torch.rand(s[key].shape, generator=g)
    for key in ("layer", "layer_loss"):
        s[key] = {i: torch.rand(1, generator=g).item() for i in s[key]}
    torch.save(s, out)
    gram = s["meta"].get("gram")
    if gram:  # the same repair statistics (they do not depend on the scores)
        link = Path(out).with_name(gram["file"])
        if not link.exists():
            link.symlink_to(Path(path).resolve().with_name(gram["file"]))
    return out


def same_block_costs(measure):
    """prune.block_costs measured once per (run length, held-out rows) for the whole bench: every
    shape here prunes the same source on the same rows, so depth variants share one measurement."""
    seen = {}

    def costs(model, rows, batch_size, droppable, n_drop):
        key = (n_drop, tuple(droppable), tuple(rows.flatten().tolist()))
        if key not in seen:
            seen[key] = measure(model, rows, batch_size, droppable, n_drop)
        return dict(seen[key])
    return costs


def main(model, scores, eval_txt, out_dir, names, seeds=RANDOM_SEEDS):
    prune.block_costs = same_block_costs(prune.block_costs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rnd = [random_scores(scores, seed, str(out / f"random{seed}.pt")) for seed in seeds]
    table = []
    for name in names:
        knobs, constants = SHAPES[name]
        args = [f"MODEL={model}", f"DATASET={eval_txt}", *EVAL_ARGS, *knobs]
        runs = [("pare", scores)] + [(f"random{seed}", p) for seed, p in zip(seeds, rnd)]
        if name.endswith(("_nocorr", "_loss", "_block", "_output", "_norepair", "_norerank",
                          "_byscore")):
            runs = runs[:1]  # variants of Pare's own choices: no random baseline needed
        for kind, path in runs:
            if name not in ACCURACY:
                constants = {**constants, "_EVAL_TASKS": []}
            res = with_recipe(constants, prune.main,
                              args + [f"SCORES={path}", f"OUTPUT={out / f'{name}-{kind}'}"])
            m = res["results"][0]["metrics"]
            table.append((name, kind, res["results"][0]["params"]["total"], m["teacher_ppl"],
                          m["student_ppl"], m["kl"]))
            acc = res["results"][0].get("downstream")
            print(f"result: {name} {kind} params={table[-1][2]} teacher_ppl={m['teacher_ppl']:.3f} "
                  f"pruned_ppl={m['student_ppl']:.3f} kl={m['kl']:.4f} layers="
                  f"{res['results'][0]['plan']['layers']}"
                  + (f" accuracy={sum(acc.values()) / len(acc):.2f} {acc}" if acc else ""), flush=True)
    print(f"{'shape':<22} {'kept by':<8} {'params':>10} {'teacher':>8} {'pruned':>9} {'KL':>7}")
    for name, kind, p, t, s, kl in table:
        print(f"{name:<22} {kind:<8} {p / 1e6:9.2f}M {t:8.3f} {s:9.3f} {kl:7.4f}")


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if x != "--no-random"]
    main(*a[:4], a[4:] or [n for n in SHAPES if n != "layers24_block"],
         () if "--no-random" in sys.argv else RANDOM_SEEDS)
