"""Stage 1 of Pare: Minitron importance scores for every width axis and every layer, one pass.

    uv run importance_analysis.py                          # Olmo-3-7B-Instruct, 1024 x 4096 tokens
    uv run importance_analysis.py MODEL=path/to/model DATASET=notes.txt NUM_SAMPLES=64

One forward pass over NUM_SAMPLES packed rows with hooks that add float32 statistics into
fixed-size buffers: per MLP neuron, attention head and hidden channel, the mean |activation| over
each row, then the L2 norm over rows (Minitron P1 Table 13), and per layer the Block Importance.
Then, on LOSS_SAMPLES further rows, the LM-loss increase when each single layer is skipped (the
hidden states entering each layer are kept from one pass, so skipping layer i runs only the
layers after it). Writes OUTPUT (the scores file prune.py reads; its keys are in the README).
The scoring pass is kept in OUTPUT.partial until the run ends: an interrupted run continues
from it when run again with the same settings.
"""

import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common

# ---- knobs: per run, `NAME=value` on the command line --------------------------------------
MODEL = "allenai/Olmo-3-7B-Instruct"   # hub id or local directory of a HF causal LM
DATASET = "allenai/Dolci-Instruct-SFT" # hub dataset (messages/text column) or local .txt/.jsonl/.parquet
NUM_SAMPLES = 1024                     # packed rows scored (Minitron P1: 1024 is enough, one pass)
SEQ_LEN = 4096                         # tokens per packed row (at least 2)
BATCH_SIZE = 8                         # rows per forward pass
LOSS_SAMPLES = 8                       # further rows for the per-layer skip loss; 0: off
DEVICE: str | None = None              # 'cuda', 'cpu', 'cuda:1'; None: cuda when available
OUTPUT = "out/scores.pt"               # scores file; prune.py reads this path by default

# ---- recipe: edit here to experiment, not per run (recorded in the scores' meta) ------------
_DTYPE = None                          # compute dtype name; None: bfloat16 on GPU, float32 on CPU
_SEED = 0                              # shuffles the documents before packing (prune.py skips these rows)
_STATE_MEMORY = 0.5                    # kept hidden states / Grams may use this share of free memory
_GRAM_ROWS = 128                       # calibration rows whose down_proj and o_proj inputs feed the
                                       # Gram matrices of prune.py's least-squares repair (ffn^2 + q^2
                                       # floats per layer: 17.6 GB for Olmo-3-7B; ~1/8 of the pass's
                                       # FLOPs on 128 of 1024 rows); 0: none


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


def add_gram(gram: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, chunk: int = 8192):
    """gram += X^T X over the real tokens of x ([B, T, C]), in float32, `chunk` tokens at a
    time (the float32 copy of a chunk is the only extra memory)."""
    flat = x.flatten(0, 1)
    if mask is not None:
        flat = flat[mask.flatten().to(flat.device).bool()]
    for i in range(0, len(flat), chunk):
        c = flat[i:i + chunk].float()
        gram += (c.T @ c).to(gram.device)


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

        self.grams = None  # {key: [per-layer X^T X]} while the batch in flight feeds them

    def add(self, key: str, layer: int, x: torch.Tensor):
        m = row_means(x, None if self.mask is None else self.mask.to(x.device))
        self.sumsq[key][layer] += m.square().sum(0).to(self.sumsq[key].device)
        if self.grams is not None and key in self.grams:
            add_gram(self.grams[key][layer], x, self.mask)

    def add_block(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor):
        # a float32 model: the whole batch at once; bf16: row by row keeps float32 copies small
        step = h_in.shape[0] if h_in.dtype == torch.float32 else 1
        for b in range(0, h_in.shape[0], step):
            d = one_minus_cos(h_in[b:b + step], h_out[b:b + step])
            if self.mask is not None:
                d = d * self.mask[b:b + step].to(d.device)
            self.bi_sum[layer] += d.sum().to(self.bi_sum.device)


def gram_buffers(config, device: torch.device) -> tuple[dict, str]:
    """Zeroed per-layer Grams of the inputs to down_proj ("mlp") and o_proj ("attention"), on
    `device` when they fit in _STATE_MEMORY of its free memory, else on the CPU."""
    f, q = config.intermediate_size, config.num_attention_heads * common.head_dim(config)
    need = config.num_hidden_layers * (f * f + q * q) * 4
    where = "cpu"
    if device.type == "cuda" and need < _STATE_MEMORY * torch.cuda.mem_get_info(device)[0]:
        where = str(device)
    print(f"repair statistics: Grams of the down_proj and o_proj inputs, {need / 2**30:.2f} GiB "
          f"on {where}" + ("" if where != "cpu" or device.type == "cpu" else
                           " (each batch's products copied there: slower)"))
    z = lambda c: [torch.zeros(c, c, device=where) for _ in range(config.num_hidden_layers)]  # noqa: E731
    return {"mlp": z(f), "attention": z(q)}, where


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
                   mask: torch.Tensor | None = None, progress: bool = True,
                   gram_rows: int = 0) -> dict:
    """One forward pass over `rows` ([N, T] token ids) -> the width and BI scores, and with
    `gram_rows` the Grams of the inputs to down_proj and o_proj over the batches of the first
    `gram_rows` rows ("grams": {"mlp": [per layer], "attention": [...]}, "gram_tokens").

    `mask` ([N, T], 1 for real tokens) excludes padding from every statistic; None: all real.
    Only the decoder runs (no lm_head), so full-vocabulary logits are never materialised.
    """
    config = model.config
    device = common.input_device(model)
    mask = torch.ones_like(rows) if mask is None else mask
    stats = Stats(config, device)
    grams, gram_tokens = (gram_buffers(config, device)[0] if gram_rows else None), 0
    handles = attach_hooks(model, family, stats)
    try:
        for b, (ids, m) in enumerate(tqdm(
                zip(common.batches(rows, batch_size), common.batches(mask, batch_size)),
                total=math.ceil(len(rows) / batch_size), desc="importance", disable=not progress)):
            m = m.to(device)
            stats.mask = None if bool(m.all()) else m
            stats.tokens += m.sum()
            stats.grams = grams if b * batch_size < gram_rows else None
            gram_tokens += int(m.sum()) if stats.grams is not None else 0
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
        **({"grams": grams, "gram_tokens": gram_tokens} if grams else {}),
    }


# ---- depth: the loss when one layer is skipped ---------------------------------------------

def state_bytes(model, rows: torch.Tensor) -> int:
    """Memory of the hidden states entering every layer for all `rows` (the prefix reuse)."""
    c = model.config
    size = torch.finfo(model.dtype).bits // 8
    return c.num_hidden_layers * rows.numel() * c.hidden_size * size


def state_device(model, rows: torch.Tensor) -> str | None:
    """Where the kept hidden states go: the model's device if they fit in _STATE_MEMORY of its
    free memory, else the CPU if they fit its free RAM the same way; None: they fit nowhere."""
    need = state_bytes(model, rows)
    device = common.input_device(model)
    if device.type == "cuda" and need < _STATE_MEMORY * torch.cuda.mem_get_info(device)[0]:
        return str(device)
    free_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "cpu" if need < _STATE_MEMORY * free_ram else None


@torch.no_grad()
def layer_inputs(model, ids: torch.Tensor, where: str) -> tuple[list[torch.Tensor], float]:
    """The hidden states entering each decoder layer for `ids` (moved to `where`), and the
    summed LM loss of the unskipped model on them, from one forward pass."""
    states = []

    def keep(mod, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).to(where))

    handles = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in model.model.layers]
    try:
        hidden = common.final_hidden(model, ids)[:, :-1].flatten(0, 1)
    finally:
        for h in handles:
            h.remove()
    return states, common.hidden_loss(model, hidden, ids)


@torch.no_grad()
def loss_from_layer(model, ids: torch.Tensor, h: torch.Tensor, skip: int) -> float:
    """Summed LM loss of `ids` with layer `skip` skipped, given `h`, the hidden state entering
    it: layers 0..skip are replaced by a stub returning `h` (the model's own loop still builds
    masks and rotary embeddings), so only the layers after `skip` are computed."""
    layers = model.model.layers[:skip + 1]
    h = h.to(common.input_device(model))
    saved = [layer.__dict__.get("forward") for layer in layers]  # accelerate may have wrapped it
    for layer in layers:
        layer.forward = lambda *args, **kwargs: h
    try:
        hidden = common.final_hidden(model, ids)[:, :-1].flatten(0, 1)
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old
    return common.hidden_loss(model, hidden, ids)


def layer_skip_losses(model, rows: torch.Tensor, batch_size: int, done: dict | None = None,
                      save=None, progress: bool = True) -> tuple[float, dict]:
    """Mean LM loss on `rows`, and its increase when each single layer is skipped.

    `done` holds increases already measured (from an interrupted run): they are not measured
    again. `save(base, increases)` is called after each layer. The states entering every layer
    are kept from one pass when they fit (see `state_device`); else each skip runs the whole
    model with the layer replaced by the identity (`common.skip_loss`), twice the work.
    """
    done = dict(done or {})
    n = len(model.model.layers)
    where = state_device(model, rows)
    gib = state_bytes(model, rows) / 2**30
    if where is None:
        print(f"skip loss: the {gib:.1f} GiB of hidden states to keep fit nowhere; "
              f"running every skipped layer's whole forward")
        base = common.skip_loss(model, rows, batch_size)
        for i in tqdm([i for i in range(n) if i not in done], desc="layer-skip loss",
                      disable=not progress):
            done[i] = common.skip_loss(model, rows, batch_size, [i]) - base
            save and save(base, done)
        return base, done
    print(f"skip loss: keeping the hidden states entering each layer ({gib:.2f} GiB on {where})")
    kept, base, count = [], 0.0, 0
    for ids in common.batches(rows, batch_size):
        states, loss = layer_inputs(model, ids, where)
        kept.append((ids, states))
        base, count = base + loss, count + ids[:, 1:].numel()
    base /= count
    for i in tqdm([i for i in range(n) if i not in done], desc="layer-skip loss",
                  disable=not progress):
        total = sum(loss_from_layer(model, ids, states[i], i) for ids, states in kept)
        done[i] = total / count - base
        save and save(base, done)
    return base, dict(sorted(done.items()))


# ---- the scores file ------------------------------------------------------------------------

def scores_meta(cfg, config, model_id: str, dtype: torch.dtype, calib, held_out) -> dict:
    """How the scores were made: the `meta` entry of the scores file (prune.py checks it)."""
    return {
        "stage": "importance", "config": vars(cfg), "recipe": common.recipe(globals()),
        "model": common.recorded_name(cfg.MODEL), "fingerprint": model_id,
        "architecture": config.architectures,
        "model_type": config.model_type, "layer_types": common.layer_types(config),
        "shape": {**common.shape_of(config), "vocab_size": config.vocab_size},
        "dataset": common.recorded_name(cfg.DATASET),
        "data_fingerprint": common.data_fingerprint(cfg.DATASET),
        "num_samples": len(calib), "num_tokens": calib.numel(), "loss_samples": len(held_out),
        "loss_tokens": len(held_out) * (cfg.SEQ_LEN - 1), "dtype": str(dtype).removeprefix("torch."),
        "versions": common.versions(), "created": common.now(),
    }


def same_run(a: dict, b: dict) -> bool:
    """Whether two metas describe the same scoring run (model content, data, settings)."""
    keys = ("fingerprint", "data_fingerprint", "recipe", "num_samples", "loss_samples", "dtype")
    config = lambda m: {k: v for k, v in m["config"].items() if k != "OUTPUT"}  # noqa: E731
    return all(a.get(k) == b.get(k) for k in keys) and config(a) == config(b)


def is_scores_file(path: Path) -> bool:
    """Whether `path` is a scores file (complete or partial) this script wrote: it may be replaced."""
    try:
        return torch.load(path, weights_only=True)["meta"]["stage"] == "importance"
    except Exception:  # anything unreadable is not ours
        return False


def write_scores(path: Path, scores: dict):
    """The scores file (a torch file, `torch.load(path, weights_only=True)`), written atomically."""
    common.write_atomic(path, lambda tmp: torch.save(scores, tmp), is_scores_file)


def gram_path(out_path: Path) -> Path:
    """Where the repair statistics go: next to the scores (out/scores.pt -> out/scores.gram.safetensors)."""
    return out_path.with_name(out_path.stem + ".gram.safetensors")


def partial_path(out_path: Path) -> Path:
    """Where the scoring pass waits until the run ends (out/scores.pt -> out/scores.pt.partial)."""
    return out_path.with_name(out_path.name + ".partial")


def is_gram_file(path: Path) -> bool:
    """Whether `path` is a Gram file this script wrote (it may be replaced)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("stage") == "importance"
    except Exception:  # anything unreadable is not ours
        return False


def write_grams(path: Path, grams: dict, tokens: int) -> dict:
    """The Grams as one safetensors file ("mlp.{layer}", "attention.{layer}"; prune.py reads
    them a layer at a time through a memory map), written atomically; returns the meta entry."""
    import uuid
    from safetensors.torch import save_file
    tensors = {f"{key}.{i}": g.cpu().contiguous() for key, per in grams.items()
               for i, g in enumerate(per)}
    pair = uuid.uuid4().hex  # the scores that name this id are the ones these Grams belong to
    common.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={
        "stage": "importance", "tokens": str(tokens), "id": pair}), is_gram_file)
    return {"file": path.name, "tokens": tokens, "id": pair}


def scoring_pass(model, family, calib: torch.Tensor, batch_size: int, meta: dict, out_path: Path
                 ) -> dict:
    """collect_scores, its Grams (first _GRAM_ROWS rows) written next to OUTPUT, and the result
    saved as OUTPUT.partial, so that an interrupt from here on keeps it."""
    scores = collect_scores(model, family, calib, batch_size, gram_rows=_GRAM_ROWS)
    bad = [k for k in ("mlp", "attention", "attn_ln", "ffn_ln") if not torch.isfinite(scores[k]).all()]
    if bad:  # a NaN score would rank nothing: refuse rather than write it
        raise common.UserError(f"MODEL={meta['model']!r} gives NaN or infinite activations "
                               f"({', '.join(bad)}): its weights are damaged or overflow in "
                               f"{meta['dtype']}; check the checkpoint (nothing was written)")
    scores.pop("tokens")
    grams = scores.pop("grams", None)
    meta["gram"] = (write_grams(gram_path(out_path), grams, scores.pop("gram_tokens"))
                    if grams else None)
    scores.update(meta=meta, layer_loss={}, base_loss=None)
    try:
        write_scores(partial_path(out_path), scores)
    except BaseException:  # no Gram file without the scores that name it
        common.remove(gram_path(out_path))
        raise
    return scores


def load_partial(path: Path, meta: dict) -> dict | None:
    """The finished scoring pass of an interrupted run with the same settings, or None."""
    if not path.exists():
        return None
    if not is_scores_file(path):
        raise common.UserError(f"{path} exists and is not a partial scores file; move it away")
    partial = torch.load(path, weights_only=True)
    if not same_run(partial["meta"], meta):
        print(f"warning: {path} is from another model or other settings; starting again")
        return None
    return partial


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

def read_rows(cfg, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """NUM_SAMPLES calibration rows and LOSS_SAMPLES held-out rows after them."""
    rows = common.calibration_rows(cfg.DATASET, tokenizer, cfg.NUM_SAMPLES + cfg.LOSS_SAMPLES,
                                   cfg.SEQ_LEN, _SEED)
    calib, held_out = rows[:cfg.NUM_SAMPLES], rows[cfg.NUM_SAMPLES:]
    if len(calib) < cfg.NUM_SAMPLES:
        print(f"warning: DATASET yields only {len(calib)} rows of {cfg.SEQ_LEN} tokens, "
              f"fewer than NUM_SAMPLES={cfg.NUM_SAMPLES}; scoring those")
    if cfg.LOSS_SAMPLES and len(held_out) == 0:
        print(f"warning: no rows left for LOSS_SAMPLES={cfg.LOSS_SAMPLES} after calibration; "
              f"skip loss disabled")
    print(f"data: {len(calib)} calibration rows + {len(held_out)} held-out rows "
          f"x {cfg.SEQ_LEN} tokens")
    return calib, held_out


def main(argv: list[str]) -> dict:
    cfg = common.configure(globals(), argv)
    common.at_least(cfg, 1, "NUM_SAMPLES", "BATCH_SIZE")
    common.at_least(cfg, 2, "SEQ_LEN")  # one next-token prediction per row at least
    common.at_least(cfg, 0, "LOSS_SAMPLES")
    inputs = {"MODEL": cfg.MODEL, "DATASET": cfg.DATASET}
    out_path = common.check_output(cfg.OUTPUT, "OUTPUT", inputs, is_scores_file)
    if _GRAM_ROWS:
        common.check_output(str(gram_path(out_path)), "OUTPUT's repair statistics", inputs,
                            is_gram_file)
    config = common.load_config(cfg.MODEL)
    family = common.family_of(config)
    common.check_positions(config, cfg.SEQ_LEN)
    device = common.pick_device(cfg.DEVICE)
    dtype = common.pick_dtype(_DTYPE, device)
    model_id = common.fingerprint(cfg.MODEL)
    tokenizer = common.load_tokenizer(cfg.MODEL)
    calib, held_out = read_rows(cfg, tokenizer)
    meta = scores_meta(cfg, config, model_id, dtype, calib, held_out)
    partial = load_partial(partial_path(out_path), meta)

    t0 = time.time()
    model = common.load_model(cfg.MODEL, device, dtype)
    t_load = time.time() - t0
    print(f"model: {config.architectures} on {device} in {dtype}, loaded in {t_load:.1f}s")
    t0 = time.time()
    if partial is None:
        scores = scoring_pass(model, family, calib, cfg.BATCH_SIZE, meta, out_path)
    else:
        scores = partial
        print(f"resume: the scoring pass and {len(scores['layer_loss'])} skipped layers from "
              f"{partial_path(out_path)}")
    t_scores = time.time() - t0

    def save(base, done):
        scores.update(base_loss=base, layer_loss=dict(done))
        write_scores(partial_path(out_path), scores)

    t0 = time.time()
    if len(held_out):
        try:
            layer_skip_losses(model, held_out, cfg.BATCH_SIZE, scores["layer_loss"], save)
        except KeyboardInterrupt:
            raise common.Interrupted(
                f"the scoring pass and {len(scores['layer_loss'])} skipped layers are saved in "
                f"{partial_path(out_path)}; run the same command again to continue") from None
    t_skip = time.time() - t0
    scores["meta"].update(created=common.now())
    write_scores(out_path, scores)
    common.remove(partial_path(out_path))

    print(report(scores, meta["layer_types"]))
    if scores["base_loss"] is not None:
        print(f"base_loss: {scores['base_loss']:.4f} nats/token on {len(held_out)} held-out rows")
    print(f"tokens: {calib.numel()}")
    print(f"time: load {t_load:.1f}s, scoring pass {t_scores:.1f}s, skip loss {t_skip:.1f}s")
    if partial is None:
        print(f"tokens_per_s: {calib.numel() / t_scores:.1f}")
    print(f"output: {out_path}")
    return {**scores, "time": {"load": t_load, "scores": t_scores, "skip_loss": t_skip}}


if __name__ == "__main__":
    common.run(main)
