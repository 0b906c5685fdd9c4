"""Stage 2 of Pare: slice a model to a smaller shape with stage 1's importance scores.

    uv run prune.py                                         # reads out/scores.pt, writes out/pruned
    uv run prune.py TARGET_FFN=8192 TARGET_HIDDEN=3584      # a target shape
    uv run prune.py TARGET_LAYERS=28 DEPTH_METRIC=block     # depth: drop the cheapest contiguous run
    uv run prune.py TARGET_KV_HEADS=8                       # MHA -> GQA: mean-pool K/V per group
    uv run prune.py TARGET_PARAMS=5e9 SAVE_TOP=3            # a parameter budget: search, rank, write

Any constant below can be overridden for one run as NAME=value. The run reads MODEL and the
scores file SCORES written by importance_analysis.py from that same model (a scores file from a
different model is refused), and writes OUTPUT: an ordinary Hugging Face directory (safetensors in
the source's dtype, config with explicit head_dim and sliced layer_types, the source's RoPE
settings in both the nested 5.x form and the legacy rope_theta/rope_scaling form, tokenizer,
chat template, generation_config.json) plus `pare.json`, the record distill.py reads: source
model, scores file, resolved constants, the kept source indices per axis, parameter counts and
the zero-shot metrics. The directory is written atomically.

What is kept (Minitron: one pass of scores, the highest-scored units survive):

- ffn: per layer, the TARGET_FFN neurons with the highest `mlp` score.
- heads: whole heads only, per layer by the `attention` score (HEAD_SCORE='output': times the
  norm of the head's o_proj columns, i.e. by what reaches the residual stream; on SmolLM2 heads
  9 -> 6 it gave held-out perplexity 82.8 against 129.1). GQA sources keep the same number
  of query heads in every kv group, ranked within the group. TARGET_KV_HEADS below the source's
  groups the kept query heads and mean-pools each group's K and V projections (and k_norm gains)
  into one kv head (MHA -> GQA; see `group_heads` for how groups are chosen).
- hidden: one set of channels for the whole model (embedding, every block, final norm, lm_head),
  by `attn_ln + ffn_ln` (see `hidden_importance`). With NORM_CORRECTION the kept gains of every
  hidden-size RMSNorm are multiplied by sqrt(H/H'), exact when the dropped channels are zero.
- layers: DEPTH_METRIC 'bi' (lowest Block Importance), 'loss' (lowest LM-loss increase when
  skipped alone) or 'block' (the contiguous run whose removal costs the least LM loss, measured
  here on the held-out rows, as in Minitron P2). KEEP_FULL_ATTENTION protects the full-attention
  layers of a model that mixes sliding and full attention.

With TARGET_PARAMS instead of a shape, candidate shapes on the HIDDEN_STEP / FFN_STEP grids
(optionally fewer layers and heads) within BUDGET_TOLERANCE under the budget are enumerated,
NUM_CANDIDATES of them are built and ranked by KL(teacher || candidate) on the held-out rows, and
the best SAVE_TOP are written (OUTPUT, OUTPUT-2, ...) for light retraining before choosing.

Held-out rows come from DATASET; when it is the scores file's dataset with the same SEED, the
tokens importance_analysis.py used are skipped so the metrics are never measured on them. The
same rows choose the 'block' run and rank budget candidates, so the printed metrics of a chosen
model are slightly optimistic; evaluate on other data for an unbiased number.
Every target is validated before any weight is loaded; a bad one is one `error:` line, exit 2.
"""

import itertools
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common

# ---- source ---------------------------------------------------------------------------------
MODEL = "allenai/Olmo-3-7B-Instruct"   # hub id or local directory: the model SCORES was made from
SCORES = "out/scores.pt"               # importance_analysis.py's OUTPUT
TRUST_REMOTE_CODE = False              # let transformers run code shipped with MODEL
DTYPE = None                           # compute dtype name; None: bfloat16 on GPU, float32 on CPU
DEVICE = None                          # 'cuda', 'cpu', ...; None: cuda when available
SAVE_DTYPE = None                      # dtype of the written weights; None: the source checkpoint's
# ---- target shape (None keeps the source's size on that axis) -------------------------------
TARGET_HIDDEN = None                   # hidden channels, one set for the whole model
TARGET_FFN = None                      # MLP neurons per layer
TARGET_HEADS = None                    # query heads per layer; divisible by the kv heads
TARGET_KV_HEADS = None                 # kv heads; below the source's: K/V mean-pooled per group
TARGET_LAYERS = None                   # decoder layers kept
# ---- how ------------------------------------------------------------------------------------
DEPTH_METRIC = "bi"                    # layers dropped by: 'bi', 'loss' (skip loss), 'block' (contiguous run)
KEEP_FULL_ATTENTION = True             # never drop full-attention layers (only when sliding ones exist)
NORM_CORRECTION = True                 # scale kept hidden-size norm gains by sqrt(H/H')
GQA_GROUPING = "similarity"            # heads sharing a pooled kv head: 'similarity' of K/V, or 'index'
HEAD_SCORE = "activation"              # heads ranked by 'activation' (Minitron) or 'output' (x o_proj norm)
# ---- parameter budget (instead of a target shape) -------------------------------------------
TARGET_PARAMS = None                   # total parameters incl. embeddings (e.g. 5e9); None: use the shape
BUDGET_TOLERANCE = 0.05                # candidates from TARGET_PARAMS * (1 - this) up to TARGET_PARAMS
HIDDEN_STEP = 256                      # hidden grid (Minitron reference search: 256)
FFN_STEP = 512                         # ffn grid (reference: 512)
SEARCH_DEPTH = False                   # also drop layers, LAYER_STEP at a time (P1 Table 1: width wins)
LAYER_STEP = 2                         # layers grid when SEARCH_DEPTH
SEARCH_HEADS = False                   # also fewer query heads (multiples of the kv heads)
MIN_KEEP = 0.5                         # smallest fraction of any axis a candidate keeps
NUM_CANDIDATES = 10                    # candidates built and ranked by KL (spread over the window)
SAVE_TOP = 1                           # best candidates written: OUTPUT, OUTPUT-2, ...
# ---- held-out data (zero-shot metrics, 'block' depth, budget ranking) -----------------------
DATASET = "allenai/Dolci-Instruct-SFT" # hub dataset (messages/text column) or local .txt/.jsonl/.parquet
NUM_SAMPLES = 16                       # held-out packed rows
SEQ_LEN = 4096                         # tokens per row
BATCH_SIZE = 4                         # rows per forward pass
SEED = 0                               # document shuffle; equal to the scores' SEED: their rows are skipped
# ---- output ---------------------------------------------------------------------------------
OUTPUT = "out/pruned"                  # checkpoint directory; distill.py reads this path by default

_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "num_hidden_layers", "head_dim")
_TARGETS = {"TARGET_HIDDEN": "hidden_size", "TARGET_FFN": "intermediate_size",
           "TARGET_HEADS": "num_attention_heads", "TARGET_KV_HEADS": "num_key_value_heads",
           "TARGET_LAYERS": "num_hidden_layers"}
_DEPTH_METRICS = ("bi", "loss", "block")
_GROUPINGS = ("similarity", "index")
_HEAD_SCORES = ("activation", "output")


# ---- inputs ---------------------------------------------------------------------------------

def same_model(a: str, b: str) -> bool:
    """Whether two MODEL strings name the same model (local paths compared once resolved)."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def load_scores(path: str, config, model: str) -> dict:
    """The scores file, checked against the model: same recorded model, same shapes."""
    if not Path(path).is_file():
        raise common.UserError(f"SCORES={path!r}: no such file; run importance_analysis.py first "
                               f"(its OUTPUT is this script's SCORES)")
    try:
        scores = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a scores file
        raise common.UserError(f"SCORES={path!r} is not a scores file ({type(e).__name__})") from None
    missing = {"mlp", "attention", "attn_ln", "ffn_ln", "layer", "meta"} - set(scores)
    if missing:
        raise common.UserError(f"SCORES={path!r} lacks {sorted(missing)}; "
                               f"rerun importance_analysis.py")
    meta = scores["meta"]
    if not same_model(str(meta.get("model")), model):
        raise common.UserError(f"SCORES={path!r} was made from MODEL={meta.get('model')!r}, "
                               f"not {model!r}")
    want = {**common.shape_of(config), "vocab_size": config.vocab_size}
    got = {k: meta.get("shape", {}).get(k) for k in want}
    if got != want:
        diff = ", ".join(f"{k} {got[k]} vs {want[k]}" for k in want if got[k] != want[k])
        raise common.UserError(f"SCORES={path!r} does not match MODEL={model!r}: {diff}")
    n, f, h = config.num_hidden_layers, config.intermediate_size, config.num_attention_heads
    if (tuple(scores["mlp"].shape) != (n, f) or tuple(scores["attention"].shape) != (n, h)
            or scores["attn_ln"].numel() != config.hidden_size):
        raise common.UserError(f"SCORES={path!r} has tensors of the wrong shape for MODEL")
    return scores


def protected_layers(types_: list[str], keep_full: bool) -> set[int]:
    """Layers never dropped: the full-attention ones, when the model also has sliding ones."""
    if keep_full and "sliding_attention" in types_:
        return {i for i, t in enumerate(types_) if t == "full_attention"}
    return set()


def target_shape(cfg, src: dict) -> dict:
    """The requested shape: each TARGET_* or the source's; an MHA source stays MHA unless
    TARGET_KV_HEADS says otherwise."""
    shape = dict(src)
    for name, key in _TARGETS.items():
        value = getattr(cfg, name)
        if value is not None:
            shape[key] = value
    if cfg.TARGET_KV_HEADS is None and src["num_key_value_heads"] == src["num_attention_heads"]:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return shape


def validate_shape(shape: dict, src: dict, model_type: str, droppable: int, where: str = ""):
    """Raise a UserError for a shape this script cannot or must not build."""
    names = {v: k for k, v in _TARGETS.items()}
    for key, name in names.items():
        v = shape[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise common.UserError(f"{where}{name}={v!r} must be a positive integer")
        if v > src[key]:
            raise common.UserError(f"{where}{name}={v} is bigger than the source's {key} "
                                   f"{src[key]}; pruning only removes")
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    if heads % kv:
        raise common.UserError(f"{where}TARGET_HEADS={heads} is not divisible by the kv heads "
                               f"{kv}: every kv head needs the same number of query heads")
    if model_type in ("llama", "mistral") and shape["hidden_size"] % heads:
        ok = [m for m in range(src["hidden_size"], 0, -1) if m % heads == 0][:3]
        raise common.UserError(f"{where}TARGET_HIDDEN={shape['hidden_size']} is not a multiple of "
                               f"the {heads} attention heads, which transformers' {model_type} "
                               f"config refuses; try one of {ok}")
    drop = src["num_hidden_layers"] - shape["num_hidden_layers"]
    if drop > droppable:
        raise common.UserError(f"{where}TARGET_LAYERS={shape['num_hidden_layers']} drops {drop} "
                               f"layers but only {droppable} may be dropped "
                               f"(KEEP_FULL_ATTENTION protects the full-attention layers)")


def check_constants(cfg):
    """Scalar constants that are wrong whatever the model."""
    if cfg.DEPTH_METRIC not in _DEPTH_METRICS:
        raise common.UserError(f"DEPTH_METRIC={cfg.DEPTH_METRIC!r}: one of {_DEPTH_METRICS}")
    if cfg.GQA_GROUPING not in _GROUPINGS:
        raise common.UserError(f"GQA_GROUPING={cfg.GQA_GROUPING!r}: one of {_GROUPINGS}")
    if cfg.HEAD_SCORE not in _HEAD_SCORES:
        raise common.UserError(f"HEAD_SCORE={cfg.HEAD_SCORE!r}: one of {_HEAD_SCORES}")
    for name in ("NUM_SAMPLES", "SEQ_LEN", "BATCH_SIZE", "HIDDEN_STEP", "FFN_STEP", "LAYER_STEP",
                 "NUM_CANDIDATES", "SAVE_TOP"):
        if getattr(cfg, name) < 1:
            raise common.UserError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.TARGET_PARAMS is not None:
        shape_targets = [n for n in _TARGETS if getattr(cfg, n) is not None]
        if shape_targets:
            raise common.UserError(f"TARGET_PARAMS and {', '.join(shape_targets)} are both set: "
                                   f"give a parameter budget or a shape, not both")
        if not isinstance(cfg.TARGET_PARAMS, (int, float)) or cfg.TARGET_PARAMS <= 0:
            raise common.UserError(f"TARGET_PARAMS={cfg.TARGET_PARAMS!r} must be a positive number")
        if not 0 < cfg.BUDGET_TOLERANCE < 1:
            raise common.UserError(f"BUDGET_TOLERANCE={cfg.BUDGET_TOLERANCE} must be in (0, 1)")
        if not 0 < cfg.MIN_KEEP <= 1:
            raise common.UserError(f"MIN_KEEP={cfg.MIN_KEEP} must be in (0, 1]")
        if cfg.SAVE_TOP > cfg.NUM_CANDIDATES:
            raise common.UserError(f"SAVE_TOP={cfg.SAVE_TOP} exceeds NUM_CANDIDATES="
                                   f"{cfg.NUM_CANDIDATES}")
    elif cfg.SAVE_TOP != 1:
        raise common.UserError("SAVE_TOP applies to a TARGET_PARAMS search only")


# ---- parameter counts -----------------------------------------------------------------------

def fmt_params(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# ---- what to keep ---------------------------------------------------------------------------

def top_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order (easier to debug; any
    consistent permutation is equivalent)."""
    return sorted(torch.topk(scores.double(), k).indices.tolist())


def hidden_importance(scores: dict) -> torch.Tensor:
    """One score per hidden channel for the whole model: attn_ln + ffn_ln, unweighted.

    Minitron sums the channel's activation over every LayerNorm of every layer (P1 sec. 2.2);
    attn_ln and ffn_ln are already summed over layers, so their sum is exactly that. Both are
    outputs of RMSNorms (unit RMS per token before the gain) and so are on the same scale; no
    rescaling is needed for either to count.
    """
    return scores["attn_ln"].double() + scores["ffn_ln"].double()


def contiguous_runs(candidates: list[int], n: int) -> list[list[int]]:
    """Every run of n consecutive entries of the droppable-layer list `candidates`."""
    return [candidates[i:i + n] for i in range(len(candidates) - n + 1)]


def choose_layers(scores: dict, metric: str, n_layers: int, n_keep: int, protected: set[int],
                  block_costs: dict | None = None) -> list[int]:
    """Sorted source indices of the layers kept. 'block' needs `block_costs` {run: loss}."""
    n_drop = n_layers - n_keep
    droppable = [i for i in range(n_layers) if i not in protected]
    if n_drop == 0:
        return list(range(n_layers))
    if metric == "block":
        drop = set(min(block_costs, key=block_costs.get))
    else:
        value = scores["layer"] if metric == "bi" else scores["layer_loss"]
        drop = set(sorted(droppable, key=lambda i: (value[i], i))[:n_drop])
    return [i for i in range(n_layers) if i not in drop]


def kv_features(k_w: torch.Tensor, v_w: torch.Tensor, k_gain: torch.Tensor | None,
                n_kv: int) -> torch.Tensor:
    """One vector per source kv head: its K rows (times the k_norm gains) and V rows."""
    k = k_w.float() * (k_gain.float()[:, None] if k_gain is not None else 1)
    return torch.cat([k.reshape(n_kv, -1), v_w.float().reshape(n_kv, -1)], 1)


def group_heads(kept: list[int], importance: torch.Tensor, features: torch.Tensor | None,
                size: int) -> list[list[int]]:
    """Partition the kept query heads into groups of `size` that will share one pooled kv head.

    Heads that share a kv head must agree on their keys and values; averaging K/V projections
    that are already alike loses the least, so groups are formed by similarity: the most
    important head not yet grouped picks the `size - 1` ungrouped heads whose K/V weights
    (`features`, by cosine) are closest to its own. Seeding by importance lets the heads that
    matter most choose their partners first. `features=None` groups consecutive kept heads
    ('index', the naive baseline to measure against). Groups come out in source order.
    """
    if features is None:
        return [kept[i:i + size] for i in range(0, len(kept), size)]
    f = torch.nn.functional.normalize(features.double(), dim=1)
    sim = f @ f.T
    left = set(kept)
    groups = []
    for seed in sorted(kept, key=lambda h: (-importance[h].item(), h)):
        if seed not in left:
            continue
        left.discard(seed)
        mates = sorted(left, key=lambda h: (-sim[seed, h].item(), h))[:size - 1]
        left -= set(mates)
        groups.append(sorted([seed, *mates]))
    return sorted(groups)


def choose_heads(importance: torch.Tensor, src: dict, shape: dict, features, grouping: str,
                 ) -> list[list[int]]:
    """Groups of kept source query heads, one group per new kv head, in the new order.

    GQA source, kv heads kept: the same number of query heads per kv group, ranked within it.
    Fewer kv heads than the source: the kept heads (top per group when that divides evenly,
    else top overall) are regrouped by `group_heads`; their K/V are pooled in `slice_layer`.
    """
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    src_heads, src_kv = src["num_attention_heads"], src["num_key_value_heads"]
    per = src_heads // src_kv
    if heads % src_kv == 0:
        kept = []
        for g in range(src_kv):
            kept += [g * per + i for i in top_sorted(importance[g * per:(g + 1) * per],
                                                     heads // src_kv)]
    else:
        kept = top_sorted(importance, heads)
    if kv == src_kv:
        return [[h for h in kept if h // per == g] for g in range(src_kv)]
    query_features = features[[h // per for h in range(src_heads)]] if grouping == "similarity" else None
    return group_heads(kept, importance, query_features, heads // kv)


def head_output_norms(o_w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Frobenius norm of each head's block of o_proj columns: how much the head's output can
    move the residual stream per unit of activation."""
    return o_w.float().view(o_w.shape[0], n_heads, -1).norm(dim=(0, 2))


def make_plan(scores: dict, src: dict, shape: dict, layers: list[int], layer_weights, cfg) -> dict:
    """Kept source indices per axis: the `kept` block of the record, with kv groups.

    `layer_weights(i)` gives layer i's (k_proj, v_proj, k_norm gains or None, o_proj) weights.
    Heads are ranked by their Minitron score (the norm of their input to o_proj) or, with
    HEAD_SCORE='output', by that times the norm of their o_proj columns: a head whose output
    o_proj scales down matters less than its activation says.
    """
    n_kv = src["num_key_value_heads"]
    plan = {"layers": layers, "hidden": top_sorted(hidden_importance(scores), shape["hidden_size"]),
            "ffn": [], "heads": [], "kv_groups": []}
    for i in layers:
        plan["ffn"].append(top_sorted(scores["mlp"][i], shape["intermediate_size"]))
        features = None
        k_w, v_w, k_gain, o_w = layer_weights(i)
        if shape["num_key_value_heads"] < n_kv and cfg.GQA_GROUPING == "similarity":
            features = kv_features(k_w, v_w, k_gain, n_kv)
        importance = scores["attention"][i]
        if cfg.HEAD_SCORE == "output":
            norms = head_output_norms(o_w, src["num_attention_heads"])
            importance = importance * norms.to(importance.device)  # weights may be on a GPU
        groups = choose_heads(importance, src, shape, features, cfg.GQA_GROUPING)
        plan["kv_groups"].append(groups)
        plan["heads"].append([h for g in groups for h in g])
    return plan


# ---- slicing --------------------------------------------------------------------------------

def take(w: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    """`w` restricted to entries `idx` along `dim`; None keeps all (no copy)."""
    return w if idx is None else w.index_select(dim, idx.to(w.device))


def index(kept: list[int], size: int, device) -> torch.Tensor | None:
    """The kept indices as a tensor, or None when all are kept in order (nothing to slice)."""
    if kept == list(range(size)):
        return None
    return torch.tensor(kept, dtype=torch.long, device=device)


def head_channels(heads: list[int], hd: int, n_heads: int, device) -> torch.Tensor | None:
    """Projection rows (or columns) of whole heads, in the given head order."""
    return index([h * hd + d for h in heads for d in range(hd)], n_heads * hd, device)


def pool_kv(w: torch.Tensor, groups: list[list[int]], per: int, hd: int) -> torch.Tensor:
    """K or V rows (or a k_norm gain vector) of the new kv heads: per group, the mean over the
    group's query heads of their source kv head's rows (exact when those are identical)."""
    sources = [[h // per for h in g] for g in groups]
    if all(set(s) == {j} for j, s in enumerate(sources)) and len(sources) * hd == len(w):
        return w  # every kv head kept as it is
    heads = w.reshape(-1, hd, *w.shape[1:])
    pooled = [heads[torch.tensor(s, device=w.device)].float().mean(0) for s in sources]
    return torch.stack(pooled).reshape(-1, *w.shape[1:]).to(w.dtype)


def slice_layer(params: dict, hidden: torch.Tensor | None, ffn: list[int],
                groups: list[list[int]], src: dict, gain_scale: float) -> dict:
    """One block's tensors ({name relative to the block: tensor}) sliced to the kept units."""
    hd, n_heads = src["head_dim"], src["num_attention_heads"]
    per = n_heads // src["num_key_value_heads"]
    device = next(iter(params.values())).device
    q_idx = head_channels([h for g in groups for h in g], hd, n_heads, device)
    f_idx = index(ffn, src["intermediate_size"], device)
    out = {}
    for name, w in params.items():
        module, kind = name.rsplit(".", 2)[-2:]
        cols = kind == "weight"  # a weight has an input dimension (dim 1); a bias does not
        if module == "q_proj":
            w = take(w, 0, q_idx)
            out[name] = take(w, 1, hidden) if cols else w
        elif module in ("k_proj", "v_proj"):
            w = pool_kv(w, groups, per, hd)
            out[name] = take(w, 1, hidden) if cols else w
        elif module == "o_proj":
            out[name] = take(take(w, 0, hidden), 1, q_idx) if cols else take(w, 0, hidden)
        elif module == "q_norm":  # Olmo: over the whole projection; Qwen3-style per-head: as is
            out[name] = take(w, 0, q_idx) if w.numel() != hd else w
        elif module == "k_norm":
            out[name] = pool_kv(w, groups, per, hd) if w.numel() != hd else w
        elif module in ("gate_proj", "up_proj"):
            w = take(w, 0, f_idx)
            out[name] = take(w, 1, hidden) if cols else w
        elif module == "down_proj":
            out[name] = take(take(w, 0, hidden), 1, f_idx) if cols else take(w, 0, hidden)
        elif module.endswith("layernorm") and w.dim() == 1:
            out[name] = take(w, 0, hidden) * gain_scale
        else:
            raise common.UserError(f"prune.py does not know how to slice the tensor {name!r}")
    return out


def slice_state_dict(state: dict, plan: dict, src: dict, norm_correction: bool) -> dict:
    """The pruned model's state dict: layers renumbered 0..n'-1, every axis sliced. Tensors
    with nothing to slice are the source's own (no copy)."""
    device = next(iter(state.values())).device
    hidden = index(plan["hidden"], src["hidden_size"], device)
    gain_scale = math.sqrt(src["hidden_size"] / len(plan["hidden"])) if norm_correction else 1.0
    by_layer: dict[int, dict] = {}
    out = {}
    for name, w in state.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            by_layer.setdefault(int(i), {})[rest] = w
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = take(w, 1, hidden)
        elif name == "model.norm.weight":
            out[name] = take(w, 0, hidden) * gain_scale
        else:
            raise common.UserError(f"prune.py does not know how to slice the tensor {name!r}")
    for new, i in enumerate(tqdm(plan["layers"], desc="slice", leave=False)):
        sliced = slice_layer(by_layer[i], hidden, plan["ffn"][new], plan["kv_groups"][new], src,
                             gain_scale)
        out.update({f"model.layers.{new}.{k}": v for k, v in sliced.items()})
    return out


def pruned_config(config, shape: dict, layers: list[int], dtype: torch.dtype):
    """The source config with the new sizes, explicit head_dim and the kept layers' types."""
    d = config.to_dict()
    d.update({k: shape[k] for k in _SHAPE_KEYS})
    if getattr(config, "layer_types", None) is not None:
        d["layer_types"] = [config.layer_types[i] for i in layers]
    d["dtype"] = str(dtype).removeprefix("torch.")
    d.pop("_name_or_path", None)
    try:
        return type(config).from_dict(d)
    except (ValueError, TypeError) as e:
        raise common.UserError(f"transformers refuses the pruned config: {e}") from None


def legacy_rope(config) -> dict:
    """`rope_theta` and a flat `rope_scaling` (of the full-attention layers), read the same way
    by transformers 4.57 (which ignores the nested `rope_parameters` of 5.x) and >= 5.13."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    if "rope_theta" not in params:
        return {}
    theta = params.pop("rope_theta")
    scaling = params if params.get("rope_type", "default") != "default" else None
    return {"rope_theta": theta, "rope_scaling": scaling}


def build_model(config, state: dict, device: str, dtype: torch.dtype):
    """A fresh model of `config` (layer indices, caches and rotary buffers consistent) with the
    sliced weights loaded strictly: any missing or unexpected tensor is an error."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(device) for k, v in state.items()}  # a no-op unless spread over GPUs
    model.load_state_dict(state, strict=True, assign=True)  # assign: no second copy
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


# ---- depth: cost of skipping runs of layers -------------------------------------------------

def block_costs(model, rows, batch_size, droppable: list[int], n_drop: int) -> dict:
    """{run of layers: held-out loss with the run skipped} for every contiguous run (within the
    droppable layers) of n_drop layers (Minitron P2: one contiguous block beat BI and PPL)."""
    runs = contiguous_runs(droppable, n_drop)
    return {tuple(r): common.skip_loss(model, rows, batch_size, r)
            for r in tqdm(runs, desc=f"block cost ({n_drop} layers)")}


# ---- budget search --------------------------------------------------------------------------

def grid(src_value: int, step: int, min_keep: float) -> list[int]:
    """The source value and every multiple of `step` below it down to min_keep * source."""
    lo = math.ceil(min_keep * src_value)
    return [src_value] + [m * step for m in range((src_value - 1) // step, 0, -1) if m * step >= lo]


def candidate_shapes(cfg, src: dict, config, droppable: int) -> tuple[list[dict], list[dict]]:
    """(all shapes within the budget window sorted by size, the NUM_CANDIDATES spread over it)."""
    heads = ([h for h in grid(src["num_attention_heads"], 1, cfg.MIN_KEEP)
              if h % src["num_key_value_heads"] == 0] if cfg.SEARCH_HEADS
             else [src["num_attention_heads"]])
    layers = ([n for n in range(src["num_hidden_layers"], 0, -cfg.LAYER_STEP)
               if n >= cfg.MIN_KEEP * src["num_hidden_layers"]
               and src["num_hidden_layers"] - n <= droppable] if cfg.SEARCH_DEPTH
              else [src["num_hidden_layers"]])
    window = []
    for h, f, nh, n in itertools.product(grid(src["hidden_size"], cfg.HIDDEN_STEP, cfg.MIN_KEEP),
                                         grid(src["intermediate_size"], cfg.FFN_STEP, cfg.MIN_KEEP),
                                         heads, layers):
        shape = {**src, "hidden_size": h, "intermediate_size": f, "num_attention_heads": nh,
                 "num_hidden_layers": n}
        if config.model_type in ("llama", "mistral") and h % nh:
            continue
        p = common.param_count(shape, config)["total"]
        if cfg.TARGET_PARAMS * (1 - cfg.BUDGET_TOLERANCE) <= p <= cfg.TARGET_PARAMS:
            window.append({**shape, "params": p})
    window.sort(key=lambda s: -s["params"])
    k = min(cfg.NUM_CANDIDATES, len(window))
    picks = sorted({round(i * (len(window) - 1) / max(k - 1, 1)) for i in range(k)})
    return window, [window[i] for i in picks]


# ---- main -----------------------------------------------------------------------------------

def held_out_rows(cfg, tokenizer, meta: dict) -> torch.Tensor:
    """NUM_SAMPLES rows of DATASET, after the tokens importance_analysis.py used if it is the
    same data in the same order (same DATASET and SEED)."""
    scored = meta.get("config", {})
    skip_tokens = 0
    if scored.get("DATASET") == cfg.DATASET and scored.get("SEED") == cfg.SEED:
        skip_tokens = (meta.get("num_samples", 0) + meta.get("loss_samples", 0)) * scored.get("SEQ_LEN", 0)
    skip = math.ceil(skip_tokens / cfg.SEQ_LEN)
    rows = list(itertools.islice(common.packed_rows(cfg.DATASET, tokenizer, cfg.SEQ_LEN, cfg.SEED),
                                 skip, skip + cfg.NUM_SAMPLES))
    if not rows:
        raise common.UserError(f"DATASET={cfg.DATASET!r} has no rows of SEQ_LEN={cfg.SEQ_LEN} left "
                               f"after the {skip_tokens} tokens importance_analysis.py used; use "
                               f"other held-out data, another SEED or a smaller SEQ_LEN")
    if len(rows) < cfg.NUM_SAMPLES:
        print(f"warning: only {len(rows)} held-out rows, fewer than NUM_SAMPLES={cfg.NUM_SAMPLES}")
    print(f"held-out: {len(rows)} rows x {cfg.SEQ_LEN} tokens"
          + (f", after the {skip_tokens} tokens used for the scores" if skip_tokens else ""))
    return torch.stack(rows)


def shape_line(src: dict, shape: dict) -> str:
    short = {"hidden_size": "hidden", "intermediate_size": "ffn", "num_attention_heads": "heads",
             "num_key_value_heads": "kv_heads", "num_hidden_layers": "layers"}
    return ", ".join(f"{v} {src[k]} -> {shape[k]}" for k, v in short.items()) + \
        f", head_dim {shape['head_dim']}"


def main(argv: list[str]) -> dict:
    cfg = common.configure(globals(), argv)
    check_constants(cfg)
    out_path = common.check_writable(cfg.OUTPUT, "OUTPUT", is_dir=True)
    config = common.load_config(cfg.MODEL, cfg.TRUST_REMOTE_CODE)
    family = common.family_of(config)
    scores = load_scores(cfg.SCORES, config, cfg.MODEL)
    src = common.shape_of(config)
    types_ = common.layer_types(config)
    protected = protected_layers(types_, cfg.KEEP_FULL_ATTENTION)
    droppable = [i for i in range(src["num_hidden_layers"]) if i not in protected]
    device = common.pick_device(cfg.DEVICE)
    dtype = common.pick_dtype(cfg.DTYPE, device)
    save_dtype = (common.pick_dtype(cfg.SAVE_DTYPE, device) if cfg.SAVE_DTYPE
                  else common.stored_dtype(config, dtype))
    if cfg.DEPTH_METRIC == "loss" and not scores.get("layer_loss"):
        raise common.UserError(f"DEPTH_METRIC='loss' needs per-layer losses, but SCORES="
                               f"{cfg.SCORES!r} has none (made with LOSS_SAMPLES=0); use 'bi' "
                               f"or 'block'")
    before = common.param_count(src, config)

    if cfg.TARGET_PARAMS is None:
        shapes = [target_shape(cfg, src)]
        validate_shape(shapes[0], src, config.model_type, len(droppable))
        pruned_config(config, shapes[0], list(range(shapes[0]["num_hidden_layers"])), save_dtype)
        window = shapes
    else:
        if cfg.TARGET_PARAMS > before["total"]:
            raise common.UserError(f"TARGET_PARAMS={cfg.TARGET_PARAMS:.4g} is bigger than the "
                                   f"source's {before['total']} parameters")
        window, shapes = candidate_shapes(cfg, src, config, len(droppable))
        if not shapes:
            raise common.UserError(
                f"no candidate shape on the grids (HIDDEN_STEP={cfg.HIDDEN_STEP}, FFN_STEP="
                f"{cfg.FFN_STEP}, MIN_KEEP={cfg.MIN_KEEP}, SEARCH_DEPTH={cfg.SEARCH_DEPTH}) has "
                f"between {cfg.TARGET_PARAMS * (1 - cfg.BUDGET_TOLERANCE):.4g} and "
                f"{cfg.TARGET_PARAMS:.4g} parameters; widen BUDGET_TOLERANCE, use finer steps, "
                f"lower MIN_KEEP or allow SEARCH_DEPTH")
        print(f"budget: {len(window)} shapes within {cfg.BUDGET_TOLERANCE:.0%} under "
              f"{fmt_params(cfg.TARGET_PARAMS)}; scoring {len(shapes)}")
        if len(shapes) < cfg.SAVE_TOP:
            raise common.UserError(f"SAVE_TOP={cfg.SAVE_TOP} but only {len(shapes)} candidates")

    tokenizer = common.load_tokenizer(cfg.MODEL, cfg.TRUST_REMOTE_CODE)
    rows = held_out_rows(cfg, tokenizer, scores["meta"])
    t0 = time.time()
    teacher = common.load_model(cfg.MODEL, device, dtype, cfg.TRUST_REMOTE_CODE)
    t_load = time.time() - t0
    print(f"model: {config.architectures} on {device} in {dtype}, loaded in {t_load:.1f}s")
    state = teacher.state_dict()

    def layer_weights(i):
        a = teacher.model.layers[i].self_attn
        return (a.k_proj.weight, a.v_proj.weight, (a.k_norm.weight if family.qk_norm else None),
                a.o_proj.weight)

    costs: dict[int, dict] = {}
    results = []
    # a search compares many candidates with one teacher: run the teacher on the rows once
    t_hidden = common.final_hiddens(teacher, rows, cfg.BATCH_SIZE) if len(shapes) > 1 else None
    t0 = time.time()
    for shape in tqdm(shapes, desc="candidates", disable=len(shapes) == 1):
        n_drop = src["num_hidden_layers"] - shape["num_hidden_layers"]
        if cfg.DEPTH_METRIC == "block" and n_drop and n_drop not in costs:
            costs[n_drop] = block_costs(teacher, rows, cfg.BATCH_SIZE, droppable, n_drop)
        layers = choose_layers(scores, cfg.DEPTH_METRIC, src["num_hidden_layers"],
                               shape["num_hidden_layers"], protected, costs.get(n_drop))
        plan = make_plan(scores, src, shape, layers, layer_weights, cfg)
        ts = time.time()
        with torch.no_grad():
            sliced = slice_state_dict(state, plan, src, cfg.NORM_CORRECTION)
        new_config = pruned_config(config, shape, layers, save_dtype)
        student = build_model(new_config, sliced, device, dtype)
        del sliced
        t_slice = time.time() - ts
        te = time.time()
        metrics = common.evaluate(student, rows, cfg.BATCH_SIZE, teacher=teacher,
                                  teacher_hidden=t_hidden)
        t_eval = time.time() - te
        if not math.isfinite(metrics["kl"]):
            raise RuntimeError(f"KL is {metrics['kl']} for shape {shape}: the slicing is broken")
        results.append({"shape": {k: shape[k] for k in _SHAPE_KEYS}, "plan": plan,
                        "metrics": metrics, "params": common.param_count(shape, config),
                        "model": student if len(shapes) == 1 else None, "t_slice": t_slice,
                        "t_eval": t_eval})
        if len(shapes) > 1:
            del student
    t_prune = time.time() - t0
    results.sort(key=lambda r: r["metrics"]["kl"])
    if cfg.TARGET_PARAMS is not None:
        print(f"{'rank':>4} {'hidden':>7} {'ffn':>7} {'heads':>5} {'kv':>3} {'layers':>6} "
              f"{'params':>10} {'KL':>8} {'ppl':>9}")
        for r, res in enumerate(results, 1):
            s, m = res["shape"], res["metrics"]
            print(f"{r:>4} {s['hidden_size']:>7} {s['intermediate_size']:>7} "
                  f"{s['num_attention_heads']:>5} {s['num_key_value_heads']:>3} "
                  f"{s['num_hidden_layers']:>6} {fmt_params(res['params']['total']):>10} "
                  f"{m['kl']:8.4f} {m['student_ppl']:9.3f}")
    search = ([{**r["shape"], "params": r["params"]["total"], **r["metrics"]} for r in results]
              if cfg.TARGET_PARAMS is not None else None)

    written = []
    t0 = time.time()
    for rank, res in enumerate(results[:cfg.SAVE_TOP], 1):
        shape, plan = res["shape"], res["plan"]
        student = res["model"]
        if student is None:  # budget search: rebuild the few written ones (memory: one at a time)
            sliced = slice_state_dict(state, plan, src, cfg.NORM_CORRECTION)
            student = build_model(pruned_config(config, shape, plan["layers"], save_dtype),
                                  sliced, device, dtype)
        student.to(save_dtype)
        path = out_path if rank == 1 else out_path.with_name(f"{out_path.name}-{rank}")
        actual = sum(p.numel() for p in student.parameters())
        if actual != res["params"]["total"]:
            print(f"warning: counted {actual} parameters, the formula says {res['params']['total']}")
        record = {
            "stage": "prune", "source_model": cfg.MODEL, "scores": cfg.SCORES, "config": vars(cfg),
            "source_shape": src, "shape": shape, "rank": rank,
            "layer_types": [types_[i] for i in plan["layers"]],
            "kept": {"layers": plan["layers"], "hidden": plan["hidden"], "ffn": plan["ffn"],
                     "heads": plan["heads"], "kv_groups": plan["kv_groups"]},
            "params": {"before": before["total"], "after": res["params"]["total"],
                       "before_non_embedding": before["non_embedding"],
                       "after_non_embedding": res["params"]["non_embedding"]},
            "metrics": res["metrics"], "search": search, "dtype": str(save_dtype),
            "versions": common.versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        common.write_checkpoint(student, cfg.MODEL, str(path), record, cfg.TRUST_REMOTE_CODE,
                                config_extra=legacy_rope(config))
        written.append(path)
        del student
    t_save = time.time() - t0

    best = results[0]
    shape, m, p = best["shape"], best["metrics"], best["params"]
    q_width = shape["num_attention_heads"] * shape["head_dim"]
    print(f"shape: {shape_line(src, shape)}")
    print(f"layers_kept: {best['plan']['layers']}")
    print(f"params: {fmt_params(before['total'])} -> {fmt_params(p['total'])} "
          f"({p['total'] / before['total']:.1%})")
    print(f"params_non_embedding: {fmt_params(before['non_embedding'])} -> "
          f"{fmt_params(p['non_embedding'])} ({p['non_embedding'] / before['non_embedding']:.1%})")
    print(f"vllm_legacy_servable: {'yes' if q_width == shape['hidden_size'] else 'no'} "
          f"(heads * head_dim = {q_width}, hidden {shape['hidden_size']})")
    print(f"teacher_ppl: {m['teacher_ppl']:.4f}")
    print(f"pruned_ppl: {m['student_ppl']:.4f}")
    print(f"kl: {m['kl']:.4f} nats/token on {m['tokens']} held-out tokens")
    print(f"time: load {t_load:.1f}s, prune+eval {t_prune:.1f}s (slice+build {best['t_slice']:.1f}s), "
          f"save {t_save:.1f}s")
    print(f"output: {', '.join(str(w) for w in written)}")
    return {"results": results, "written": written, "before": before,
            "time": {"load": t_load, "prune_and_eval": t_prune, "save": t_save,
                     "eval": sum(r["t_eval"] for r in results)}}


if __name__ == "__main__":
    common.run(main)
