"""Do the MLP scores carry signal? Zero 25% of every layer's neurons, chosen three ways.

    uv run bench/bench_importance_signal.py SCORES MODEL_DIR EVAL_TXT [FRACTION=0.25 ROWS=8 SEQ_LEN=256]

Loads the model and a scores file from importance_analysis.py, then measures the loss on
held-out text (a file not used for calibration) with the down_proj columns of the lowest-scored,
a random (3 seeds) and the highest-scored FRACTION of neurons in every layer set to zero. If the
scores mean anything, lowest << random << highest in loss increase.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

FRACTION = 0.25   # share of each layer's MLP neurons zeroed
ROWS = 8          # held-out rows of SEQ_LEN tokens
SEQ_LEN = 256     # tokens per row


def loss_with_zeroed(model, rows, chosen: torch.Tensor) -> float:
    """Mean held-out loss with neurons chosen[l] of every layer l silenced (weights restored)."""
    saved = [b.mlp.down_proj.weight.detach().clone() for b in model.model.layers]
    with torch.no_grad():
        for block, idx in zip(model.model.layers, chosen):
            block.mlp.down_proj.weight[:, idx] = 0
        total, count = common.lm_loss(model, rows)
        for block, w in zip(model.model.layers, saved):
            block.mlp.down_proj.weight.copy_(w)
    return total / count


def main():
    paths = [a for a in sys.argv[1:] if "=" not in a]
    if len(paths) != 3:
        raise SystemExit(__doc__)
    cfg = common.configure(globals(), [a for a in sys.argv[1:] if "=" in a])
    scores_path, model_dir, eval_txt = paths
    mlp = torch.load(scores_path, weights_only=True)["mlp"]
    model = common.load_model(model_dir, "cpu", torch.float32)
    tok = common.load_tokenizer(model_dir)
    rows = common.calibration_rows(eval_txt, tok, cfg.ROWS, cfg.SEQ_LEN, seed=0)
    k = int(cfg.FRACTION * mlp.shape[1])
    base = loss_with_zeroed(model, rows, torch.empty(mlp.shape[0], 0, dtype=torch.long))
    low = loss_with_zeroed(model, rows, mlp.argsort(1)[:, :k])
    high = loss_with_zeroed(model, rows, mlp.argsort(1, descending=True)[:, :k])
    rand = [loss_with_zeroed(model, rows, torch.stack([
        torch.randperm(mlp.shape[1], generator=torch.Generator().manual_seed(s + 100 * layer))[:k]
        for layer in range(mlp.shape[0])])) for s in range(3)]
    r = sum(rand) / len(rand)
    print(f"held_out_tokens: {rows.numel()}")
    print(f"zeroed_per_layer: {k} of {mlp.shape[1]}")
    print(f"loss_base: {base:.4f}")
    print(f"loss_zero_lowest: {low:.4f}  (+{low - base:.4f})")
    print(f"loss_zero_random: {r:.4f}  (+{r - base:.4f}; seeds {', '.join(f'{x:.4f}' for x in rand)})")
    print(f"loss_zero_highest: {high:.4f}  (+{high - base:.4f})")
    print(f"increase_ratio_random_over_lowest: {(r - base) / max(low - base, 1e-9):.1f}")


if __name__ == "__main__":
    main()
