"""Stage 1 of Pare: Minitron importance scores for every width axis and every layer, one pass.

    uv run importance_analysis.py                          # Olmo-3-7B-Instruct, 1024 x 4096 tokens
    uv run importance_analysis.py MODEL=path/to/model DATASET=notes.txt NUM_SAMPLES=64

Any constant below can be overridden for one run as NAME=value (a Python literal, else a
string). The run reads MODEL (hub id or local directory) and DATASET (hub dataset with a
`messages` or `text` column, or a local .txt / .jsonl / .parquet file), packs NUM_SAMPLES rows of
SEQ_LEN tokens, and makes one forward pass with hooks that accumulate float32 statistics in
fixed-size buffers (memory does not grow with the number of tokens). It then measures, on
LOSS_SAMPLES further rows, the LM-loss increase when each single layer is skipped.

Aggregation (Minitron P1 Table 13, the winning one): per row take the mean of |activation| over
the sequence, then the L2 norm over all rows.

Writes OUTPUT, a torch file loadable with `torch.load(path, weights_only=True)`:

    mlp         [n_layers, intermediate_size]  per neuron, the input to down_proj
    attention   [n_layers, n_heads]            per query head: per channel of the input to
                                               o_proj, then the L2 norm over the head's channels
    attn_ln     [hidden_size]                  per hidden channel, the attention block's norm
                                               output, summed over layers (Olmo:
                                               post_attention_layernorm; Llama: input_layernorm)
    ffn_ln      [hidden_size]                  the same for the MLP block's norm (Olmo:
                                               post_feedforward_layernorm; Llama:
                                               post_attention_layernorm)
    layer       {layer index: float}           Block Importance, 1 - cos(h_in, h_out), token mean
    layer_loss  {layer index: float}           LM-loss increase (nats/token) when that layer is
                                               skipped; empty when LOSS_SAMPLES = 0
    base_loss   float | None                   the unskipped loss on those rows
    meta        dict                           resolved config, model, architecture, shapes,
                                               layer_types, sample/token counts, versions
"""

import math
import os
import time

import torch
from tqdm import tqdm

import common

# ---- model ----------------------------------------------------------------------------------
MODEL = "allenai/Olmo-3-7B-Instruct"   # hub id or local directory of a HF causal LM
TRUST_REMOTE_CODE = False              # let transformers run code shipped with MODEL
DTYPE = None                           # torch dtype name; None: bfloat16 on GPU, float32 on CPU
DEVICE = None                          # 'cuda', 'cpu', ...; None: cuda when available
# ---- calibration data -----------------------------------------------------------------------
DATASET = "allenai/Dolci-Instruct-SFT" # hub dataset (messages/text column) or local .txt/.jsonl/.parquet
NUM_SAMPLES = 1024                     # packed rows scored (Minitron P1: 1024 is enough, one pass)
SEQ_LEN = 4096                         # tokens per packed row
BATCH_SIZE = 8                         # rows per forward pass
SEED = 0                               # shuffles the documents before packing
LOSS_SAMPLES = 8                       # rows for the per-layer skip loss (n_layers+1 passes); 0: off
# ---- output ---------------------------------------------------------------------------------
OUTPUT = "out/scores.pt"               # scores file; prune.py reads this path by default


# ---- statistics -----------------------------------------------------------------------------

def row_means(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of |x| over the real tokens of each row: [B, T, C] -> [B, C], float32.

    mask ([B, T], 1 for real tokens) None means every token is real (packed rows).
    """
    count = (torch.full((x.shape[0], 1), x.shape[1], device=x.device) if mask is None
             else mask.sum(1, keepdim=True).clamp(min=1)).float()
    if x.dtype == torch.float32:  # a [1, T] x [T, C] product per row: the fastest CPU reduction
        w = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
        return torch.bmm(w[:, None, :], x.abs()).squeeze(1) / count
    a = x.abs()  # bf16 / fp16: sum with a float32 accumulator, never a low-precision product
    if mask is not None:
        a.mul_(mask[..., None].to(a.dtype))
    return a.sum(1, dtype=torch.float32) / count


def one_minus_cos(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_in, h_out) per token ([..., D] -> [...]), computed in float32."""
    x, y = h_in.float(), h_out.float()  # no copy when the model already runs in float32
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return 1 - torch.linalg.vecdot(x, y) / norms.clamp(min=1e-8)


class Stats:
    """Fixed-size float32 buffers of sums of squared row means, filled by forward hooks.

    sumsq[key][layer] accumulates sum over rows of (mean_t |x|)^2 per channel, so the final
    score is its square root (L2 norm over rows). Block Importance is kept as a running sum of
    (1 - cos) over real tokens and a token count.
    """

    def __init__(self, config, device):
        n, h = config.num_hidden_layers, config.hidden_size
        q = config.num_attention_heads * common.head_dim(config)
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        self.sumsq = {"mlp": z(n, config.intermediate_size), "attention": z(n, q),
                      "attn_ln": z(n, h), "ffn_ln": z(n, h)}
        self.bi_sum, self.tokens = z(n), z(())
        self.mask = None  # [B, T] of the batch in flight; None when every token is real

    def add(self, key: str, layer: int, x: torch.Tensor):
        m = row_means(x, None if self.mask is None else self.mask.to(x.device))
        self.sumsq[key][layer] += m.square().sum(0).to(self.sumsq[key].device)

    def add_block(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor):
        # a float32 model: the whole batch at once; bf16: row by row keeps float32 copies small
        step = h_in.shape[0] if h_in.dtype == torch.float32 else 1
        for b in range(0, h_in.shape[0], step):
            d = one_minus_cos(h_in[b:b + step], h_out[b:b + step])
            if self.mask is not None:
                d = d * self.mask[b:b + step].to(d.device)
            self.bi_sum[layer] += d.sum().to(self.bi_sum.device)


def attach_hooks(model, family: common.Family, stats: Stats) -> list:
    """Register the hooks that feed `stats`; returns handles to remove."""
    handles = []
    for i, block in enumerate(model.model.layers):
        def pre(key, i=i):
            return lambda mod, args: stats.add(key, i, args[0])

        def post(key, i=i):
            return lambda mod, args, out: stats.add(key, i, out)

        def block_hook(mod, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            stats.add_block(i, h_in, out[0] if isinstance(out, tuple) else out)

        handles += [
            block.mlp.down_proj.register_forward_pre_hook(pre("mlp")),
            block.self_attn.o_proj.register_forward_pre_hook(pre("attention")),
            getattr(block, family.attn_norm).register_forward_hook(post("attn_ln")),
            getattr(block, family.mlp_norm).register_forward_hook(post("ffn_ln")),
            block.register_forward_hook(block_hook, with_kwargs=True),
        ]
    return handles


@torch.no_grad()
def collect_scores(model, family: common.Family, rows: torch.Tensor, batch_size: int,
                   mask: torch.Tensor | None = None, progress: bool = True) -> dict:
    """One forward pass over `rows` ([N, T] token ids) -> the width and BI scores.

    `mask` ([N, T], 1 for real tokens) excludes padding from every statistic; None: all real.
    Only the decoder runs (no lm_head), so full-vocabulary logits are never materialised.
    """
    config = model.config
    device = common.input_device(model)
    mask = torch.ones_like(rows) if mask is None else mask
    stats = Stats(config, device)
    handles = attach_hooks(model, family, stats)
    try:
        for ids, m in tqdm(zip(common.batches(rows, batch_size), common.batches(mask, batch_size)),
                           total=math.ceil(len(rows) / batch_size), desc="importance",
                           disable=not progress):
            m = m.to(device)
            stats.mask = None if bool(m.all()) else m
            stats.tokens += m.sum()
            # no mask for packed rows: transformers then takes its fast causal-attention path
            model.model(input_ids=ids.to(device), attention_mask=stats.mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hd = common.head_dim(config)
    n = config.num_hidden_layers
    heads = stats.sumsq["attention"].view(n, config.num_attention_heads, hd).sum(-1).sqrt()
    bi = (stats.bi_sum / stats.tokens).tolist()
    return {
        "mlp": stats.sumsq["mlp"].sqrt().cpu(),
        "attention": heads.cpu(),
        "attn_ln": stats.sumsq["attn_ln"].sqrt().sum(0).cpu(),
        "ffn_ln": stats.sumsq["ffn_ln"].sqrt().sum(0).cpu(),
        "layer": {i: bi[i] for i in range(n)},
        "tokens": int(stats.tokens.item()),
    }


def layer_skip_losses(model, rows: torch.Tensor, batch_size: int, progress: bool = True,
                      ) -> tuple[float, dict]:
    """Mean LM loss on `rows`, and its increase when each single layer is skipped."""
    base = common.skip_loss(model, rows, batch_size)
    layers = range(len(model.model.layers))
    increase = {i: common.skip_loss(model, rows, batch_size, [i]) - base
                for i in tqdm(layers, desc="layer-skip loss", disable=not progress)}
    return base, increase


# ---- report ---------------------------------------------------------------------------------

def top_half_counts(mlp: torch.Tensor) -> list[int]:
    """Per layer, how many neurons fall in the global top half after dividing each layer's
    scores by that layer's mean (spots layers whose neurons are weak across the board)."""
    norm = mlp / mlp.mean(1, keepdim=True).clamp(min=1e-30)
    threshold = norm.flatten().median()
    return (norm > threshold).sum(1).tolist()


def report(scores: dict, types_: list[str]) -> str:
    """The per-layer table, the sliding-vs-full line and the top/bottom layers by each metric."""
    bi, loss = scores["layer"], scores["layer_loss"]
    heads = scores["attention"].mean(1).tolist()
    top = top_half_counts(scores["mlp"])
    ffn = scores["mlp"].shape[1]
    fmt = lambda v: f"{v:10.4f}" if v is not None else f"{'-':>10}"  # noqa: E731
    lines = [f"{'layer':>5} {'type':>8} {'BI':>10} {'skip loss':>10} {'head mean':>10} "
             f"{'mlp top-half':>13}"]
    for i in range(len(bi)):
        kind = "sliding" if types_[i] == "sliding_attention" else "full"
        lines.append(f"{i:>5} {kind:>8} {fmt(bi[i])} {fmt(loss.get(i))} {heads[i]:10.4f} "
                     f"{top[i]:>6}/{ffn:<6}")
    for name, vals in (("BI", bi), ("skip loss", loss)):
        if not vals:
            continue
        groups = {k: [vals[i] for i in vals if (types_[i] == "sliding_attention") == (k == "sliding")]
                  for k in ("sliding", "full")}
        means = ", ".join(f"{k} {sum(v) / len(v):.4f} (n={len(v)})" for k, v in groups.items() if v)
        order = sorted(vals, key=vals.get, reverse=True)
        lines.append(f"{name}: mean by type: {means}")
        lines.append(f"{name}: most important layers {order[:3]}, least important {order[-3:][::-1]}")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------

def main(argv: list[str]) -> dict:
    cfg = common.configure(globals(), argv)
    for name in ("NUM_SAMPLES", "SEQ_LEN", "BATCH_SIZE"):
        if getattr(cfg, name) < 1:
            raise common.UserError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.LOSS_SAMPLES < 0:
        raise common.UserError(f"LOSS_SAMPLES must be 0 or more, got {cfg.LOSS_SAMPLES}")
    out_path = common.check_writable(cfg.OUTPUT, "OUTPUT")
    config = common.load_config(cfg.MODEL, cfg.TRUST_REMOTE_CODE)
    family = common.family_of(config)
    device = common.pick_device(cfg.DEVICE)
    dtype = common.pick_dtype(cfg.DTYPE, device)

    tokenizer = common.load_tokenizer(cfg.MODEL, cfg.TRUST_REMOTE_CODE)
    rows = common.calibration_rows(cfg.DATASET, tokenizer, cfg.NUM_SAMPLES + cfg.LOSS_SAMPLES,
                                   cfg.SEQ_LEN, cfg.SEED)
    calib, held_out = rows[:cfg.NUM_SAMPLES], rows[cfg.NUM_SAMPLES:]
    if len(calib) < cfg.NUM_SAMPLES:
        print(f"warning: DATASET yields only {len(calib)} rows of {cfg.SEQ_LEN} tokens, "
              f"fewer than NUM_SAMPLES={cfg.NUM_SAMPLES}; scoring those")
    if cfg.LOSS_SAMPLES and len(held_out) == 0:
        print(f"warning: no rows left for LOSS_SAMPLES={cfg.LOSS_SAMPLES} after calibration; "
              f"skip-loss disabled")
    print(f"data: {len(calib)} calibration rows + {len(held_out)} held-out rows "
          f"x {cfg.SEQ_LEN} tokens")

    t0 = time.time()
    model = common.load_model(cfg.MODEL, device, dtype, cfg.TRUST_REMOTE_CODE)
    print(f"model: {config.architectures} on {device} in {dtype}, loaded in {time.time() - t0:.1f}s")
    t0 = time.time()
    scores = collect_scores(model, family, calib, cfg.BATCH_SIZE)
    t_scores = time.time() - t0
    base_loss, layer_loss = (layer_skip_losses(model, held_out, cfg.BATCH_SIZE)
                             if len(held_out) else (None, {}))
    scores["layer_loss"], scores["base_loss"] = layer_loss, base_loss
    tokens = scores.pop("tokens")
    types_ = common.layer_types(config)
    scores["meta"] = {
        "config": vars(cfg), "model": cfg.MODEL, "architecture": config.architectures,
        "model_type": config.model_type, "layer_types": types_,
        "shape": {**common.shape_of(config), "vocab_size": config.vocab_size},
        "num_samples": len(calib), "num_tokens": tokens, "loss_samples": len(held_out),
        "loss_tokens": len(held_out) * (cfg.SEQ_LEN - 1), "dtype": str(dtype).removeprefix("torch."),
        "versions": common.versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(scores, tmp)
    os.replace(tmp, out_path)

    print(report(scores, types_))
    if base_loss is not None:
        print(f"base_loss: {base_loss:.4f} nats/token on {len(held_out)} held-out rows")
    print(f"tokens: {tokens}")
    print(f"tokens_per_s: {tokens / t_scores:.1f}")
    print(f"output: {out_path}")
    return scores


if __name__ == "__main__":
    common.run(main)
