"""Depth and the repair: does refitting the layer before a dropped block win back its loss?

    uv run bench/bench_depth_refit.py MODEL SCORES CALIB_TXT EVAL_TXT OUT_DIR [N_LAYERS=24]

Prunes MODEL to N_LAYERS layers with prune.py's defaults (`block`: the contiguous run whose
removal costs the least held-out loss), then refits, for each gap, the down_proj of the last
kept layer before it, so that its output also carries what the dropped layers added to the
residual stream on CALIB_TXT's rows: least squares A = (W G + D^T X)(G + lambda I)^-1 over the
calibration tokens (X: down_proj's input, D: the dropped block's residual update, G = X^T X,
lambda as in prune.refit). The layers before a gap see the same inputs as in the source model,
so the statistics from one pass of the source are exact for them. Prints held-out perplexity and
KL of the sliced and of the refitted model. Pre-norm (Llama-like) models only: in Olmo 3 the MLP
output passes a norm before it reaches the residual stream.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import common  # noqa: E402
import prune  # noqa: E402

CALIB_ROWS, EVAL_ROWS, SEQ_LEN, BATCH = 32, 16, 256, 4


def gaps(kept: list[int], n_layers: int) -> list[tuple[int, int]]:
    """(last kept source layer before a gap, first source layer after it) for each gap."""
    ends = kept + [n_layers]
    return [(a, b) for a, b in zip(kept, ends[1:]) if b > a + 1]


def statistics(model, rows: torch.Tensor, pairs: list[tuple[int, int]]) -> dict:
    """Per gap (a, b): G = X^T X of layer a's down_proj input and C = D^T X, D = h_{b-1} - h_a
    (the residual stream after layer b-1 minus after layer a), summed over the rows' tokens."""
    layers, got, hooks = model.model.layers, {}, []
    stats = {p: [0, 0] for p in pairs}

    def keep(name):
        def hook(_module, args, output=None):
            t = args[0] if output is None else (output[0] if isinstance(output, tuple) else output)
            got[name] = t.detach().double().flatten(0, 1)
        return hook
    for a, b in pairs:
        hooks.append(layers[a].mlp.down_proj.register_forward_pre_hook(keep(("x", a))))
        for i in (a, b - 1):
            hooks.append(layers[i].register_forward_hook(keep(("h", i))))
    try:
        with torch.no_grad():
            for ids in common.batches(rows, BATCH):
                model.model(input_ids=ids)
                for a, b in pairs:
                    x, d = got[("x", a)], got[("h", b - 1)] - got[("h", a)]
                    stats[(a, b)][0] += x.T @ x
                    stats[(a, b)][1] += d.T @ x
    finally:
        for h in hooks:
            h.remove()
    return stats


def main(model_dir, scores, calib, eval_txt, out_dir, n_layers="24"):
    out = Path(out_dir) / f"layers{n_layers}-sliced"
    res = prune.main([f"MODEL={model_dir}", f"SCORES={scores}", f"DATASET={eval_txt}",
                      f"NUM_SAMPLES={EVAL_ROWS}", f"SEQ_LEN={SEQ_LEN}", f"TARGET_LAYERS={n_layers}",
                      f"OUTPUT={out}"])
    kept = res["results"][0]["plan"]["layers"]
    teacher = common.load_model(model_dir, "cpu", torch.float32)
    pairs = gaps(kept, teacher.config.num_hidden_layers)
    print(f"kept layers: {kept}; gaps (layer refitted, next kept): {pairs}")
    tok = common.load_tokenizer(model_dir)
    stats = statistics(teacher, common.calibration_rows(calib, tok, CALIB_ROWS, SEQ_LEN, 0), pairs)
    student = common.load_model(str(out), "cpu", torch.float32)
    rows = common.calibration_rows(eval_txt, tok, EVAL_ROWS, SEQ_LEN, prune._SEED)
    before = common.evaluate(student, rows, BATCH, teacher=teacher)
    with torch.no_grad():
        for (a, b), (G, C) in stats.items():
            lin = student.model.layers[kept.index(a)].mlp.down_proj
            W = lin.weight.double()
            lam = prune._REPAIR_DAMPING * G.diagonal().mean()
            H = G + lam * torch.eye(len(G), dtype=G.dtype)
            A = torch.linalg.solve(H, (W @ G + C).T).T  # H symmetric: A H = W G + C
            lin.weight.copy_(A.float())
    after = common.evaluate(student, rows, BATCH, teacher=teacher)
    print(f"teacher_ppl: {before['teacher_ppl']:.3f}")
    for name, m in (("sliced", before), ("refitted", after)):
        print(f"result: layers{n_layers} {name} ppl={m['student_ppl']:.3f} kl={m['kl']:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
