"""Stage 2 of Pare: slice a model to a smaller shape with stage 1's importance scores.

    uv run prune.py TARGET_FFN=8192 TARGET_HIDDEN=3584      # a target shape (None keeps an axis)
    uv run prune.py TARGET_LAYERS=28                        # depth: the cheapest contiguous run
    uv run prune.py TARGET_KV_HEADS=8                       # MHA -> GQA: K/V mean-pooled per group
    uv run prune.py TARGET_PARAMS=5e9 SAVE_TOP=3            # a parameter budget: search, rank, write 3
    uv run prune.py TARGET_SPEEDUP=1.6                      # decode 1.6x faster here, least KL

Reads SCORES (importance_analysis.py's output) and the model it was made from (MODEL, checked by
content), keeps the highest-scored units of every axis (neurons and heads per layer, one set of
hidden channels for the whole model, layers by the recipe's depth metric), loads the sliced
weights strictly into a fresh model of the pruned config and writes an ordinary Hugging Face
directory with `pare.json`, the record distill.py reads. With TARGET_PARAMS, candidate shapes on
the recipe's grids are ranked by KL(teacher || candidate) on held-out rows of DATASET (after the
rows the scores used) and the best SAVE_TOP written as OUTPUT, OUTPUT-2, ...; TARGET_SPEEDUP
first keeps the shapes whose decode, timed on this device, is that much faster.
"""

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import common

# ---- knobs: per run, `NAME=value` on the command line --------------------------------------
MODEL: str | None = None               # hub id or local directory; None: the model SCORES was made from
SCORES = "out/scores.pt"               # importance_analysis.py's OUTPUT
TARGET_HIDDEN: int | None = None       # hidden channels, one set for the whole model
TARGET_FFN: int | None = None          # MLP neurons per layer
TARGET_HEADS: int | None = None        # query heads per layer; divisible by the kv heads
TARGET_KV_HEADS: int | None = None     # kv heads; below the source's: K/V mean-pooled per group
TARGET_LAYERS: int | None = None       # decoder layers kept
TARGET_PARAMS: float | None = None     # parameter budget incl. embeddings (e.g. 5e9), instead of a shape
TARGET_SPEEDUP: float | None = None    # decode at batch 1 this many x faster than MODEL, measured
                                       # here (a search over depth and width; with TARGET_PARAMS too)
SAVE_TOP = 1                           # best searched candidates written: OUTPUT, OUTPUT-2, ...
REPAIR = True                          # refit down_proj / o_proj to the kept neurons and heads by
                                       # least squares on SCORES' statistics (when it has them), and
                                       # fold dropped layers into the layer before them
DATASET: str | None = None             # held-out data: hub dataset or local file; None: SCORES'
NUM_SAMPLES = 16                       # held-out packed rows (zero-shot metrics, depth, ranking)
SEQ_LEN: int | None = None             # tokens per held-out row; None: SCORES' SEQ_LEN
DEVICE: str | None = None              # 'cuda', 'cpu', 'cuda:1'; None: cuda when available
OUTPUT = "out/pruned"                  # checkpoint directory; distill.py reads this path by default

# ---- recipe: edit here to experiment, not per run (recorded in every pare.json) -------------
# Minitron P1 (arXiv 2407.14679), P2 (arXiv 2408.11796) and NVIDIA's reference search.
_DEPTH_METRIC = "block"                # 'block': the contiguous run of layers whose removal costs the
                                       # least held-out loss (P2; on SmolLM2 30->24 ppl 44.5 vs 'loss'
                                       # 44.9, 'bi' 51.6); 'bi': lowest Block Importance; 'loss':
                                       # lowest single-layer skip loss from SCORES
_KEEP_FULL_ATTENTION = True            # never drop Olmo 3's full-attention layers (if sliding ones exist)
_HEAD_SCORE = "activation"             # heads by Minitron's score; 'output': times the o_proj column
                                       # norm (SmolLM2 heads 9->6: ppl 82.8 vs 129.1; one model only)
_GQA_GROUPING = "similarity"           # query heads sharing a pooled kv head: 'similarity' of K/V
                                       # ('index': consecutive heads, the naive baseline)
_NORM_CORRECTION = True                # scale kept hidden-size norm gains by sqrt(H/H') (olmo3.md;
                                       # SmolLM2 hidden 576->504: ppl 92.1 vs 116.7 without)
_GRID_STEPS = 16                       # search grids: each axis moves in 1/16 of its source size
                                       # (Olmo-3-7B: hidden 256, ffn 688, layers 2, as NVIDIA's
                                       # reference search's 256 / 512 / 2), rounded to a multiple
                                       # of 8 (and of the heads where the config needs it)
_SEARCH_DEPTH = False                  # the budget search also drops layers (P1 Table 1: width wins)
_SEARCH_HEADS = False                  # the budget search also tries fewer query heads
_BUDGET_TOLERANCE = 0.05               # candidates from TARGET_PARAMS * (1 - this) up to TARGET_PARAMS
_MIN_KEEP = 0.5                        # smallest share of any axis a candidate keeps (P1: prune at
                                       # most ~30-40% at once; go further in steps)
_NUM_CANDIDATES = 10                   # candidates built and ranked by KL (reference: top ~10)
# Latency (Nemotron-Flash, arXiv 2511.18890: fewer parameters need not mean proportionally
# faster). A fixed workload timed on random weights of each candidate's shape (the time does not
# depend on the values); a TARGET_SPEEDUP search always tries fewer layers and heads too.
_LATENCY_PROMPT = 1024                 # prompt tokens, one prefill forward
_LATENCY_NEW_TOKENS = 64               # then tokens decoded one at a time with the KV cache
_LATENCY_BATCHES = (1, 16)             # batch sizes timed; TARGET_SPEEDUP is the first one's decode
_LATENCY_WARMUP = 2                    # untimed runs, then the median of _LATENCY_REPEATS timed ones
_LATENCY_REPEATS = 5
_SPEEDUP_TOLERANCE = 0.15              # candidates from TARGET_SPEEDUP up to 1.15 x it
_REPAIR_DAMPING = 1e-3                 # ridge of the repair: this x the mean diagonal of the kept Gram
_REPAIR_SELECT = True                  # with the repair, cut the MLP neurons and the query heads its
                                       # refit replaces best (greedy OBS; SmolLM2 ffn 1024: ppl 44.7
                                       # vs 49.7 by activation)
_REPAIR_ROUNDS = 64                    # neurons leave in this many batches (1 per round: 44.705,
                                       # 64: 44.703, 16: 44.915 on that shape)
_DEPTH_FIT_ROWS = 64                   # depth repair: SCORES' first calibration rows it fits on
_DEPTH_CHECK_TOKENS = 8192             # of their tokens, kept out of each fit to check it (at most
                                       # a quarter)
_DEPTH_RERANK = 3                      # 'block' with the repair: its cheapest runs measured again
                                       # repaired, the best of those dropped (0: as without it)
_BATCH_SIZE = 4                        # held-out rows per forward pass
_DTYPE = None                          # compute dtype; None: bfloat16 on GPU, float32 on CPU
_SAVE_DTYPE = None                     # written weights; None: the source checkpoint's dtype
# Downstream accuracy of the source and of each written model (benchmarks.py; []: none).
_EVAL_TASKS = ["arc_easy:rc_0shot", "piqa:rc_0shot", "mmlu"]
_EVAL_TASK_DOCS = 50                   # the first documents of each task
_SEED = 0                              # held-out document shuffle (importance_analysis._SEED: its
                                       # rows are skipped when DATASET is the same)

TARGETS = {"TARGET_HIDDEN": "hidden_size", "TARGET_FFN": "intermediate_size",
           "TARGET_HEADS": "num_attention_heads", "TARGET_KV_HEADS": "num_key_value_heads",
           "TARGET_LAYERS": "num_hidden_layers"}
DEPTH_METRICS, GROUPINGS, HEAD_SCORES = ("bi", "loss", "block"), ("similarity", "index"), (
    "activation", "output")
SCORES_KEYS = ("mlp", "attention", "attn_ln", "ffn_ln", "layer", "layer_loss", "meta")
META_KEYS = ("stage", "model", "fingerprint", "shape", "config", "recipe", "num_samples",
             "loss_samples", "gram")


# ---- inputs ---------------------------------------------------------------------------------

def load_scores(path: str) -> dict:
    """The scores file (the one reader of importance_analysis.py's format): keys, meta, values."""
    if not Path(path).is_file():
        raise common.UserError(f"SCORES={path!r}: no such file; run importance_analysis.py first "
                               f"(its OUTPUT is this script's SCORES)")
    try:
        scores = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a scores file
        raise common.UserError(f"SCORES={path!r} is not a scores file ({type(e).__name__})") from None
    missing = [k for k in SCORES_KEYS if not isinstance(scores, dict) or k not in scores]
    missing += [f"meta.{k}" for k in META_KEYS if not missing and k not in scores["meta"]]
    if missing:
        raise common.UserError(f"SCORES={path!r} lacks {missing}; rerun importance_analysis.py")
    for key in ("mlp", "attention", "attn_ln", "ffn_ln"):
        if not torch.isfinite(scores[key]).all():
            raise common.UserError(f"SCORES={path!r} has NaN or infinite values in {key!r} (the "
                                   f"model's activations overflowed); rerun importance_analysis.py "
                                   f"in float32 (its _DTYPE)")
    return scores


def check_scores(scores: dict, path: str, config, model: str, model_id: str):
    """The scores were made from this model: same shapes, same content (by fingerprint; the
    same model moved or copied is accepted, other weights at the same path are not)."""
    meta = scores["meta"]
    changed = common.changed_settings(meta["shape"], {**common.shape_of(config),
                                                      "vocab_size": config.vocab_size})
    if changed:
        diff = ", ".join(f"{k} {saved} vs {now}" for k, (saved, now) in changed.items())
        raise common.UserError(f"SCORES={path!r} does not match MODEL={model!r}: {diff}")
    n, f, h = config.num_hidden_layers, config.intermediate_size, config.num_attention_heads
    if (tuple(scores["mlp"].shape) != (n, f) or tuple(scores["attention"].shape) != (n, h)
            or scores["attn_ln"].numel() != config.hidden_size):
        raise common.UserError(f"SCORES={path!r} has tensors of the wrong shape for MODEL")
    if meta["fingerprint"] != model_id:
        raise common.UserError(f"SCORES={path!r} was made from MODEL={meta['model']!r} with other "
                               f"weights than {model!r} holds now (fingerprint {meta['fingerprint']}"
                               f" vs {model_id}); rerun importance_analysis.py on this model")
    if meta["model"] != model:
        print(f"note: SCORES was made from {meta['model']!r}; {model!r} has the same content")


def protected_layers(types_: list[str], keep_full: bool) -> set[int]:
    """Layers never dropped: the full-attention ones, when the model also has sliding ones."""
    if keep_full and "sliding_attention" in types_:
        return {i for i, t in enumerate(types_) if t == "full_attention"}
    return set()


def target_shape(cfg, src: dict) -> dict:
    """The requested shape: each TARGET_* or the source's; an MHA source stays MHA unless
    TARGET_KV_HEADS says otherwise."""
    shape = dict(src)
    for name, key in TARGETS.items():
        value = getattr(cfg, name)
        if value is not None:
            shape[key] = value
    if cfg.TARGET_KV_HEADS is None and src["num_key_value_heads"] == src["num_attention_heads"]:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return shape


def nearest_multiples(value: int, of: int, limit: int, k: int = 3) -> list[int]:
    """The k multiples of `of` (at most `limit`) nearest to `value`."""
    multiples = range(of, limit + 1, of)
    return sorted(sorted(multiples, key=lambda m: (abs(m - value), m))[:k])


def validate_shape(shape: dict, src: dict, model_type: str, droppable: int, where: str = ""):
    """Raise a UserError for a shape this script cannot or must not build."""
    names = {v: k for k, v in TARGETS.items()}
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
        ok = nearest_multiples(shape["hidden_size"], heads, src["hidden_size"])
        raise common.UserError(f"{where}TARGET_HIDDEN={shape['hidden_size']} is not a multiple of "
                               f"the {heads} attention heads, which transformers' {model_type} "
                               f"config refuses; the nearest that work: {ok}")
    drop = src["num_hidden_layers"] - shape["num_hidden_layers"]
    if drop > droppable:
        raise common.UserError(f"{where}TARGET_LAYERS={shape['num_hidden_layers']} drops {drop} "
                               f"layers but only {droppable} may be dropped "
                               f"(_KEEP_FULL_ATTENTION protects the full-attention layers)")


def check_knobs(cfg):
    """Knobs and recipe constants that are wrong whatever the model."""
    for name, value, valid in (("_DEPTH_METRIC", _DEPTH_METRIC, DEPTH_METRICS),
                               ("_GQA_GROUPING", _GQA_GROUPING, GROUPINGS),
                               ("_HEAD_SCORE", _HEAD_SCORE, HEAD_SCORES)):
        if value not in valid:
            raise common.UserError(f"{name}={value!r} in prune.py: one of {valid}")
    common.at_least(cfg, 1, "NUM_SAMPLES", "SAVE_TOP")
    if cfg.SEQ_LEN is not None:
        common.at_least(cfg, 2, "SEQ_LEN")
    shape_targets = [n for n in TARGETS if getattr(cfg, n) is not None]
    if cfg.TARGET_PARAMS is not None:
        if shape_targets:
            raise common.UserError(f"TARGET_PARAMS and {', '.join(shape_targets)} are both set: "
                                   f"give a parameter budget or a shape, not both")
        if cfg.TARGET_PARAMS <= 0:
            raise common.UserError(f"TARGET_PARAMS={cfg.TARGET_PARAMS!r} must be a positive number")
    if cfg.TARGET_SPEEDUP is not None:
        if shape_targets:
            raise common.UserError(f"TARGET_SPEEDUP and {', '.join(shape_targets)} are both set: "
                                   f"give a speed-up (and a budget) or a shape, not both")
        if cfg.TARGET_SPEEDUP <= 1:
            raise common.UserError(f"TARGET_SPEEDUP={cfg.TARGET_SPEEDUP!r} must be above 1 (the "
                                   f"source's decode time / the candidate's)")
    if cfg.TARGET_PARAMS is None and cfg.TARGET_SPEEDUP is None and cfg.SAVE_TOP != 1:
        raise common.UserError("SAVE_TOP applies to a TARGET_PARAMS or TARGET_SPEEDUP search only")
    if cfg.SAVE_TOP > _NUM_CANDIDATES:
        raise common.UserError(f"SAVE_TOP={cfg.SAVE_TOP} exceeds the {_NUM_CANDIDATES} "
                               f"candidates ranked (_NUM_CANDIDATES)")


def output_paths(cfg, inputs: dict) -> list[Path]:
    """OUTPUT, OUTPUT-2, ... (SAVE_TOP of them), each checked to be safe to write."""
    names = [cfg.OUTPUT] + [f"{cfg.OUTPUT.rstrip('/')}-{r}" for r in range(2, cfg.SAVE_TOP + 1)]
    return [common.check_output(n, "OUTPUT", inputs, lambda p: common.is_record_of(p, "prune"))
            for n in names]


def held_out_defaults(cfg, meta: dict):
    """DATASET and SEQ_LEN left None take the values SCORES was made with (so that the held-out
    rows are the same kind of text, at a length the model was scored at)."""
    took = [k for k in ("DATASET", "SEQ_LEN") if getattr(cfg, k) is None]
    for k in took:  # the scores' DATASET as recorded (resolved), else as typed there
        setattr(cfg, k, meta.get("dataset", meta["config"][k]) if k == "DATASET" else meta["config"][k])
    if took:
        print(f"held-out data: {', '.join(f'{k}={getattr(cfg, k)!r}' for k in took)} (from SCORES)")


def held_out_rows(cfg, tokenizer, meta: dict) -> torch.Tensor:
    """NUM_SAMPLES rows of DATASET, after the tokens importance_analysis.py used if it is the
    same data in the same order (same DATASET and seed)."""
    skip_tokens = 0
    same = common.recorded_name(cfg.DATASET) in (meta.get("dataset"), meta["config"].get("DATASET"))
    if same and meta["recipe"].get("_SEED") == _SEED:
        skip_tokens = (meta["num_samples"] + meta["loss_samples"]) * meta["config"]["SEQ_LEN"]
    skip = math.ceil(skip_tokens / cfg.SEQ_LEN)
    try:
        rows = common.calibration_rows(cfg.DATASET, tokenizer, cfg.NUM_SAMPLES, cfg.SEQ_LEN, _SEED,
                                       skip_rows=skip)
    except common.UserError as e:
        raise common.UserError(f"{e} (the {skip_tokens} tokens importance_analysis.py used are "
                               f"not held out); use other held-out data") from None
    if len(rows) < cfg.NUM_SAMPLES:
        print(f"warning: only {len(rows)} held-out rows, fewer than NUM_SAMPLES={cfg.NUM_SAMPLES}")
    print(f"held-out: {len(rows)} rows x {cfg.SEQ_LEN} tokens"
          + (f", after the {skip_tokens} tokens used for the scores" if skip_tokens else ""))
    return rows


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
                 kept: list[int] | None = None) -> list[list[int]]:
    """Groups of kept source query heads, one group per new kv head, in the new order.

    GQA source, kv heads kept: the same number of query heads per kv group, ranked within it.
    Fewer kv heads than the source: the kept heads (top per group when that divides evenly,
    else top overall) are regrouped by `group_heads`; their K/V are pooled in `slice_layer`.
    `kept`: the heads to keep, chosen otherwise (surgeon_heads), under the same rule.
    """
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    src_heads, src_kv = src["num_attention_heads"], src["num_key_value_heads"]
    per = src_heads // src_kv
    if kept is None and heads % src_kv == 0:
        kept = []
        for g in range(src_kv):
            kept += [g * per + i for i in top_sorted(importance[g * per:(g + 1) * per],
                                                     heads // src_kv)]
    elif kept is None:
        kept = top_sorted(importance, heads)
    if kv == src_kv:
        return [[h for h in kept if h // per == g] for g in range(src_kv)]
    query_features = features[[h // per for h in range(src_heads)]] if grouping == "similarity" else None
    return group_heads(kept, importance, query_features, heads // kv)


def head_output_norms(o_w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Frobenius norm of each head's block of o_proj columns: how much the head's output can
    move the residual stream per unit of activation."""
    return o_w.float().view(o_w.shape[0], n_heads, -1).norm(dim=(0, 2))


def layer_weights(model, family: common.Family):
    """A function giving layer i's (k_proj, v_proj, k_norm gains or None, o_proj) weights."""
    def get(i):
        a = model.model.layers[i].self_attn
        return (a.k_proj.weight, a.v_proj.weight, (a.k_norm.weight if family.qk_norm else None),
                a.o_proj.weight)
    return get


def make_plan(scores: dict, src: dict, shape: dict, layers: list[int], layer_weights,
              grouping: str = "similarity", head_score: str = "activation",
              head_choice: Callable | None = None) -> dict:
    """Kept source indices per axis: the `kept` block of the record, with kv groups.

    `layer_weights(i)` gives layer i's (k_proj, v_proj, k_norm gains or None, o_proj) weights.
    Heads are ranked by their Minitron score (the norm of their input to o_proj) or, with
    head_score='output', by that times the norm of their o_proj columns: a head whose output
    o_proj scales down matters less than its activation says. `head_choice(i)`: layer i's kept
    heads chosen otherwise (the repair's surgeon), or None for the ranking's.
    """
    n_kv = src["num_key_value_heads"]
    plan = {"layers": layers, "hidden": top_sorted(hidden_importance(scores), shape["hidden_size"]),
            "ffn": [], "heads": [], "kv_groups": []}
    for i in layers:
        plan["ffn"].append(top_sorted(scores["mlp"][i], shape["intermediate_size"]))
        features = None
        k_w, v_w, k_gain, o_w = layer_weights(i)
        if shape["num_key_value_heads"] < n_kv and grouping == "similarity":
            features = kv_features(k_w, v_w, k_gain, n_kv)
        importance = scores["attention"][i]
        if head_score == "output":
            norms = head_output_norms(o_w, src["num_attention_heads"])
            importance = importance * norms.to(importance.device)  # weights may be on a GPU
        kept = head_choice(i) if head_choice is not None else None
        groups = choose_heads(importance, src, shape, features, grouping, kept)
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


def norm_gain_scale(src: dict, plan: dict, norm_correction: bool) -> float:
    """sqrt(H / H'): an RMSNorm over fewer channels sees a larger mean square (olmo3.md)."""
    return math.sqrt(src["hidden_size"] / len(plan["hidden"])) if norm_correction else 1.0


def slice_state_dict(state: dict, plan: dict, src: dict, norm_correction: bool) -> dict:
    """The pruned model's state dict: layers renumbered 0..n'-1, every axis sliced. Tensors
    with nothing to slice are the source's own (no copy)."""
    device = next(iter(state.values())).device
    hidden = index(plan["hidden"], src["hidden_size"], device)
    gain_scale = norm_gain_scale(src, plan, norm_correction)
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
    d.update({k: shape[k] for k in common.SHAPE_KEYS})
    if getattr(config, "layer_types", None) is not None:
        d["layer_types"] = [config.layer_types[i] for i in layers]
    d["dtype"] = str(dtype).removeprefix("torch.")
    d.pop("_name_or_path", None)
    try:
        return type(config).from_dict(d)
    except (ValueError, TypeError) as e:
        raise common.UserError(f"transformers refuses the pruned config: {e}") from None


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


# ---- repair: least-squares refit of what reads the pruned channels --------------------------

def refit(w: torch.Tensor, gram: torch.Tensor, kept: list[int], damping: float) -> tuple:
    """(columns A for the kept inputs, relative output error of W[:, K], of A) for y = W x.

    A minimises E||W x - A x_K||^2 over the calibration tokens whose Gram is G = sum x x^T:
    A = W G[:, K] (G_KK + lambda I)^-1, lambda = damping x mean diag(G_KK) (ridge: a singular G_KK,
    e.g. a neuron that never fires, stays solvable). The error of any A is known from G alone,
    tr(W G W^T) - 2 tr(A G_K: W^T) + tr(A G_KK A^T), so the repair is kept only where it is
    smaller than plain slicing's (never worse on the calibration tokens). Float64 throughout.
    """
    W, G = w.double(), gram.to(w.device).double()
    K = torch.tensor(kept, device=W.device)
    G_K = G[K]
    G_KK = G_K[:, K]
    total = ((W @ G) * W).sum().clamp(min=1e-300)

    def error(A):
        return ((total - 2 * ((A @ G_K) * W).sum() + ((A @ G_KK) * A).sum()) / total).item()

    sliced = W[:, K]
    lam = damping * G_KK.diagonal().mean().clamp(min=1e-30)
    chol, info = torch.linalg.cholesky_ex(G_KK + lam * torch.eye(len(K), dtype=G.dtype,
                                                                 device=G.device))
    A = torch.cholesky_solve(G_K @ W.T, chol).T if info == 0 else None
    before = error(sliced)
    after = error(A) if A is not None and torch.isfinite(A).all() else math.inf
    return (A if after < before else sliced).to(w.dtype), before, min(before, after)


def damped_inverse(w: torch.Tensor, gram: torch.Tensor, damping: float) -> tuple | None:
    """(W in float64, (G + lambda I)^-1) for the surgeon, lambda = damping x the mean diagonal of
    G; None when G + lambda I cannot be factored."""
    W, G = w.double(), gram.to(w.device).double()
    n = G.shape[0]
    lam = damping * G.diagonal().mean().clamp(min=1e-30)
    chol, info = torch.linalg.cholesky_ex(G + lam * torch.eye(n, dtype=G.dtype, device=G.device))
    if info != 0 or not torch.isfinite(chol).all():
        return None
    return W, torch.cholesky_inverse(chol)


def surgeon_keep(w: torch.Tensor, gram: torch.Tensor, n_keep: int, damping: float,
                 rounds: int) -> list[int] | None:
    """The `n_keep` inputs of y = W x to keep so that refitting W on them (refit) loses the least:
    greedy Optimal Brain Surgeon for whole inputs (Hassibi & Stork 1993; structured, as in
    SlimGPT, arXiv 2412.18110). With H = G + lambda I, cutting input j and compensating with the
    rest costs ||W[:, j]||^2 / (H^-1)_jj; the cheapest inputs go, W and H^-1 are updated as if
    they had never been there, `rounds` times (inputs leaving in one round are chosen by their
    own cost: two that could stand in for each other may leave together, so rounds should be
    many). Sorted indices, or None when H cannot be factored.
    """
    inverse = damped_inverse(w, gram, damping)
    if inverse is None:
        return None
    W, Hi = inverse
    n = Hi.shape[0]
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    cut, per = 0, max(1, math.ceil((n - n_keep) / rounds))
    while cut < n - n_keep:
        cost = torch.where(alive, (W * W).sum(0) / Hi.diagonal().clamp(min=1e-300), math.inf)
        S = cost.topk(min(per, n - n_keep - cut), largest=False).indices
        inv = torch.linalg.pinv(Hi[S][:, S], hermitian=True)  # the block of H^-1 for the cut
        W = W - (W[:, S] @ inv) @ Hi[S]
        Hi = Hi - Hi[:, S] @ inv @ Hi[S]
        alive[S], cut = False, cut + len(S)
    return alive.nonzero().flatten().tolist()


def surgeon_heads(w: torch.Tensor, gram: torch.Tensor, head_dim: int, groups: list[list[int]],
                  per_group: int, damping: float) -> list[int] | None:
    """The query heads to keep, `per_group` of each of `groups` (kv groups, or one group of all),
    so that refitting o_proj on them loses the least: surgeon_keep's criterion for whole heads,
    each a block S of `head_dim` input columns, whose cut costs tr(W_S [(H^-1)_SS]^-1 W_S^T).
    One head leaves per round (heads are few). Sorted, or None when H cannot be factored."""
    inverse = damped_inverse(w, gram, damping)
    if inverse is None:
        return None
    W, Hi = inverse
    alive = [list(g) for g in groups]

    def cols(h):
        return torch.arange(h * head_dim, (h + 1) * head_dim, device=W.device)

    while any(len(g) > per_group for g in alive):
        best = None
        for g in alive:
            for h in g if len(g) > per_group else []:
                S = cols(h)
                inv = torch.linalg.pinv(Hi[S][:, S], hermitian=True)
                cost = ((W[:, S] @ inv) * W[:, S]).sum().item()
                if best is None or cost < best[0]:
                    best = (cost, h, g, S, inv)
        _, h, g, S, inv = best
        W = W - (W[:, S] @ inv) @ Hi[S]
        Hi = Hi - Hi[:, S] @ inv @ Hi[S]
        g.remove(h)
    return sorted(h for g in alive for h in g)


def repair_heads(state: dict, grams, layer: int, src: dict, n_heads: int, damping: float,
                 memo: dict) -> list[int] | None:
    """Layer `layer`'s kept query heads for the repair (surgeon_heads on its o_proj, the same
    count from every kv group when that divides evenly), memoised in `memo`; None (keep the
    activation ranking's) when the Gram cannot be factored."""
    if ("heads", layer, n_heads) not in memo:
        src_heads, src_kv = src["num_attention_heads"], src["num_key_value_heads"]
        per = src_heads // src_kv
        even = n_heads % src_kv == 0
        groups = ([list(range(g * per, (g + 1) * per)) for g in range(src_kv)] if even
                  else [list(range(src_heads))])
        memo["heads", layer, n_heads] = surgeon_heads(
            state[f"model.layers.{layer}.self_attn.o_proj.weight"], grams("attention", layer),
            src["head_dim"], groups, n_heads // src_kv if even else n_heads, damping)
    return memo["heads", layer, n_heads]


def repair_choice(state: dict, grams, layer: int, n_keep: int, damping: float, rounds: int,
                  memo: dict) -> list[int] | None:
    """Layer `layer`'s kept MLP neurons for the repair (surgeon_keep on its down_proj), memoised
    in `memo`; None (keep the activation ranking's) when the Gram cannot be factored."""
    if (layer, n_keep) not in memo:
        memo[layer, n_keep] = surgeon_keep(state[f"model.layers.{layer}.mlp.down_proj.weight"],
                                           grams("mlp", layer), n_keep, damping, rounds)
    return memo[layer, n_keep]


def repair(sliced: dict, state: dict, plan: dict, src: dict, grams, damping: float) -> dict:
    """Replace, in the sliced state dict, each layer's down_proj (when neurons were cut) and
    o_proj (when heads were) by its least-squares refit on the source's statistics; rows are
    then sliced to the kept hidden channels. An axis left whole stays exactly the original.
    Returns {"mlp" / "attention": (mean relative error before, after)} over the layers."""
    hd, heads = src["head_dim"], src["num_attention_heads"]
    hidden = index(plan["hidden"], src["hidden_size"], next(iter(state.values())).device)
    errors = {"mlp": [], "attention": []}
    for new, i in enumerate(plan["layers"]):
        for key, name, kept, width in (
                ("mlp", "mlp.down_proj.weight", plan["ffn"][new], src["intermediate_size"]),
                ("attention", "self_attn.o_proj.weight",
                 [h * hd + d for h in plan["heads"][new] for d in range(hd)], heads * hd)):
            if len(kept) == width:
                continue
            w, before, after = refit(state[f"model.layers.{i}.{name}"], grams(key, i), kept,
                                     damping)
            sliced[f"model.layers.{new}.{name}"] = take(w, 0, hidden)
            errors[key].append((before, after))
    return {k: (sum(e[0] for e in v) / len(v), sum(e[1] for e in v) / len(v))
            for k, v in errors.items() if v}


def open_grams(scores_path: str, meta: dict):
    """`grams(key, layer)`: one layer's Gram from the statistics next to SCORES (memory-mapped,
    read a layer at a time), or None when the scores have none."""
    from safetensors import safe_open
    if not meta["gram"]:
        return None
    path = Path(scores_path).with_name(meta["gram"]["file"])
    if not path.is_file():
        raise common.UserError(f"SCORES' repair statistics {path} are missing; rerun "
                               f"importance_analysis.py or set REPAIR=False")
    with safe_open(str(path), "pt") as f:  # written by the same run as the scores?
        pair = (f.metadata() or {}).get("id")
    if pair is None or meta["gram"].get("id") is None:
        raise common.UserError(f"SCORES={scores_path!r} and {path} were written by an older "
                               f"version of importance_analysis.py; rerun it or set REPAIR=False")
    if pair != meta["gram"]["id"]:
        raise common.UserError(f"the repair statistics {path} belong to another run of "
                               f"importance_analysis.py than SCORES={scores_path!r} (an "
                               f"interrupted or concurrent run?); rerun importance_analysis.py "
                               f"or set REPAIR=False")

    def grams(key: str, layer: int) -> torch.Tensor:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(f"{key}.{layer}")
    return grams


# ---- one candidate: plan, slice, repair, build ----------------------------------------------

@dataclass
class Cut:
    """How prune_one chooses, slices and repairs: main fills it from the recipe constants (the
    defaults are their values). With `grams(key, layer)` (open_grams) the matrices reading
    pruned neurons and heads are refit; with `select` too, the MLP neurons cut are the ones the
    refit compensates best, chosen once per (layer, width) and kept in `memo`. With `depth`,
    each run of dropped layers is folded into the layer kept before it (depth_repair.py)."""
    grouping: str = "similarity"          # _GQA_GROUPING
    head_score: str = "activation"        # _HEAD_SCORE
    norm_correction: bool = True          # _NORM_CORRECTION
    grams: Callable | None = None         # the repair's statistics; None: slicing only
    depth: Callable | None = None         # depth_repair.stats_source's stats_of(p, end); None: none
    damping: float = 1e-3                 # _REPAIR_DAMPING
    select: bool = True                   # _REPAIR_SELECT
    rounds: int = 64                      # _REPAIR_ROUNDS
    memo: dict = field(default_factory=dict)  # shared by candidates of one width and rebuilds


def prune_one(model, scores: dict, shape: dict, layers: list[int], dtype: torch.dtype, cut: Cut,
              state: dict | None = None) -> tuple:
    """(pruned model, plan): `model` cut to `shape` keeping source layers `layers`, the units
    chosen by `scores` as `cut` says, the sliced weights loaded strictly into a fresh model of
    the pruned config (saved dtype `dtype`). `state`: `model.state_dict()` when the caller has
    it. With the repair the plan holds its relative output errors (before, after) per matrix
    kind."""
    config = model.config
    src = common.shape_of(config)
    state = model.state_dict() if state is None else state
    head_choice = None
    if cut.grams is not None and cut.select and shape["num_attention_heads"] < src["num_attention_heads"]:
        def head_choice(i):
            return repair_heads(state, cut.grams, i, src, shape["num_attention_heads"], cut.damping,
                                cut.memo)
    plan = make_plan(scores, src, shape, layers, layer_weights(model, common.family_of(config)),
                     cut.grouping, cut.head_score, head_choice)
    with torch.no_grad():
        n_ffn = shape["intermediate_size"]
        if cut.grams is not None and cut.select and n_ffn < src["intermediate_size"]:
            plan["ffn"] = [repair_choice(state, cut.grams, i, n_ffn, cut.damping, cut.rounds,
                                         cut.memo) or by_score
                           for i, by_score in zip(layers, plan["ffn"])]
        sliced = slice_state_dict(state, plan, src, cut.norm_correction)
        repaired = repair(sliced, state, plan, src, cut.grams, cut.damping) if cut.grams else {}
        if cut.depth is not None and len(layers) < src["num_hidden_layers"]:
            import depth_repair  # only when layers are dropped with REPAIR on
            errors = depth_repair.repair(sliced, plan, state, src["num_hidden_layers"],
                                         common.family_of(config), cut.depth, cut.damping,
                                         norm_gain_scale(src, plan, cut.norm_correction),
                                         config.rms_norm_eps)
            if errors:
                repaired["depth"] = errors
        if cut.grams is not None or cut.depth is not None:
            plan["repair"] = repaired
    new_config = pruned_config(config, shape, layers, dtype)
    device = str(common.input_device(model))
    return build_model(new_config, sliced, device, model.dtype), plan


def fit_rows(meta: dict, tokenizer) -> torch.Tensor:
    """The depth repair's rows: the first _DEPTH_FIT_ROWS of the calibration rows SCORES was
    made from (same data, seed and length; the held-out rows stay unseen by every fit)."""
    n = min(meta["num_samples"], _DEPTH_FIT_ROWS)
    try:
        rows = common.calibration_rows(meta["dataset"], tokenizer, n, meta["config"]["SEQ_LEN"],
                                       meta["recipe"]["_SEED"])
    except common.UserError as e:
        raise common.UserError(f"{e}; the depth repair fits on SCORES' calibration data: make it "
                               f"available or set REPAIR=False") from None
    print(f"depth repair: fits on {len(rows)} calibration rows x {rows.shape[1]} tokens of SCORES' "
          f"data")
    return rows


# ---- search: a parameter budget or a speed-up -----------------------------------------------

def grid_steps(src: dict, model_type: str, divisions: int) -> tuple[int, int, int]:
    """(hidden, ffn, layer) steps of the search grids for this model: 1/`divisions` of each
    source size, rounded to a multiple of 8 channels (tensor-core friendly) and, for the hidden
    size of a Llama or Mistral config (which must divide by the heads), of the query heads; at
    least one unit, so that every model Pare supports gets several points on each axis."""
    def step(size: int, unit: int) -> int:
        return max(unit, round(size / divisions / unit) * unit)
    hidden_unit = math.lcm(8, src["num_attention_heads"]) if model_type in ("llama", "mistral") else 8
    return (step(src["hidden_size"], hidden_unit), step(src["intermediate_size"], 8),
            max(1, round(src["num_hidden_layers"] / divisions)))


def grid(src_value: int, step: int, min_keep: float) -> list[int]:
    """The source value and every multiple of `step` below it down to min_keep * source."""
    lo = math.ceil(min_keep * src_value)
    return [src_value] + [m * step for m in range((src_value - 1) // step, 0, -1) if m * step >= lo]


def grid_shapes(src: dict, config, droppable: int, depth: bool, heads: bool, steps: tuple,
                min_keep: float) -> list[dict]:
    """Every shape on the recipe's grids (with its parameter count), largest first: hidden, ffn
    and layers by `steps` (grid_steps), each axis kept
    to at least `min_keep` of the source's. `depth` / `heads`: also fewer layers / query heads."""
    hidden_step, ffn_step, layer_step = steps
    head_grid = ([h for h in grid(src["num_attention_heads"], 1, min_keep)
                  if h % src["num_key_value_heads"] == 0] if heads
                 else [src["num_attention_heads"]])
    n = src["num_hidden_layers"]
    layer_grid = ([k for k in range(n, 0, -layer_step) if k >= min_keep * n and n - k <= droppable]
                  if depth else [n])
    shapes = []
    for h, f, nh, k in itertools.product(grid(src["hidden_size"], hidden_step, min_keep),
                                         grid(src["intermediate_size"], ffn_step, min_keep),
                                         head_grid, layer_grid):
        shape = {**src, "hidden_size": h, "intermediate_size": f, "num_attention_heads": nh,
                 "num_hidden_layers": k}
        if config.model_type in ("llama", "mistral") and h % nh:
            continue
        shapes.append({**shape, "params": common.param_count(shape, config)["total"]})
    return sorted(shapes, key=lambda s: -s["params"])


def spread(window: list, k: int) -> list:
    """k items of `window` spread evenly over it, its first and last included."""
    k = min(k, len(window))
    return [window[i] for i in sorted({round(i * (len(window) - 1) / max(k - 1, 1))
                                       for i in range(k)})]


def latency_config(config, shape: dict, protected: set[int]):
    """The config a candidate of `shape` would get, for timing: the layers it drops are taken
    from the unprotected ones (which ones does not change the time, only how many of each
    attention type remain)."""
    n, keep = config.num_hidden_layers, shape["num_hidden_layers"]
    free = [i for i in range(n) if i not in protected]
    dropped = set(free[len(free) - (n - keep):]) if n > keep else set()
    return pruned_config(config, shape, [i for i in range(n) if i not in dropped], torch.float32)


def plan_shapes(cfg, src: dict, config, protected: set[int], device: str, dtype: torch.dtype
                ) -> tuple[list[dict], dict | None]:
    """(the shapes to build: the target shape, or a search's candidates spread over its window
    on the grids; for a TARGET_SPEEDUP search the latencies: latency.speed_window's record, with
    "shapes", each candidate's measurement and "speedup")."""
    droppable = src["num_hidden_layers"] - len(protected)
    if cfg.TARGET_PARAMS is None and cfg.TARGET_SPEEDUP is None:
        if all(getattr(cfg, n) is None for n in TARGETS):
            raise common.UserError(f"no target: set one of {', '.join(TARGETS)}, TARGET_PARAMS or "
                                   f"TARGET_SPEEDUP (without one, prune.py would write a copy of MODEL)")
        shape = target_shape(cfg, src)
        validate_shape(shape, src, config.model_type, droppable)
        pruned_config(config, shape, list(range(shape["num_hidden_layers"])), torch.float32)
        return [shape], None
    total = common.param_count(src, config)["total"]
    if cfg.TARGET_PARAMS is not None and cfg.TARGET_PARAMS > total:
        raise common.UserError(f"TARGET_PARAMS={cfg.TARGET_PARAMS:.4g} is bigger than the "
                               f"source's {total} parameters")
    speed = cfg.TARGET_SPEEDUP is not None  # a speed-up search always tries fewer layers and heads
    steps = grid_steps(src, config.model_type, _GRID_STEPS)
    print(f"search grids: hidden step {steps[0]}, ffn step {steps[1]}, layer step {steps[2]} "
          f"(1/{_GRID_STEPS} of each axis), down to {_MIN_KEEP:.0%} of each")
    grid_ = grid_shapes(src, config, droppable, speed or _SEARCH_DEPTH, speed or _SEARCH_HEADS,
                        steps, _MIN_KEEP)
    if speed:
        import latency  # the TARGET_SPEEDUP search's timing (latency.py), only in this branch
        work = latency.workload(config, _LATENCY_PROMPT, _LATENCY_NEW_TOKENS, _LATENCY_BATCHES,
                                _LATENCY_WARMUP, _LATENCY_REPEATS)
        if cfg.TARGET_PARAMS is not None:
            grid_ = [s for s in grid_ if s["params"] <= cfg.TARGET_PARAMS]
        timed = [config] + [latency_config(config, s, protected) for s in grid_]
        window, lat = latency.speed_window(
            grid_, timed, device, dtype, work, Path(cfg.OUTPUT).parent / "latency.json",
            target=cfg.TARGET_SPEEDUP, tolerance=_SPEEDUP_TOLERANCE, k=_NUM_CANDIDATES,
            budget=cfg.TARGET_PARAMS)
        shapes = spread(window, _NUM_CANDIDATES)
        lat["shapes"] = [s["latency"] for s in shapes]
    else:
        lo = cfg.TARGET_PARAMS * (1 - _BUDGET_TOLERANCE)
        window = [s for s in grid_ if lo <= s["params"] <= cfg.TARGET_PARAMS]
        if not window:
            raise common.UserError(
                f"no candidate shape on the grids (_GRID_STEPS={_GRID_STEPS}, _MIN_KEEP={_MIN_KEEP}, "
                f"_SEARCH_DEPTH={_SEARCH_DEPTH}) has between {lo:.4g} and {cfg.TARGET_PARAMS:.4g} "
                f"parameters; set a lower _MIN_KEEP, a larger _GRID_STEPS or _SEARCH_DEPTH=True "
                f"in prune.py")
        shapes = spread(window, _NUM_CANDIDATES)
        print(f"budget: {len(window)} shapes within {_BUDGET_TOLERANCE:.0%} under "
              f"{fmt_params(cfg.TARGET_PARAMS)}; scoring {len(shapes)}")
        lat = None
    if len(shapes) < cfg.SAVE_TOP:
        raise common.UserError(f"SAVE_TOP={cfg.SAVE_TOP} but only {len(shapes)} candidates")
    return [{k: s[k] for k in common.SHAPE_KEYS} for s in shapes], lat


# ---- the candidates, built and measured -----------------------------------------------------

def score_candidates(teacher, scores: dict, shapes: list[dict], rows: torch.Tensor,
                     protected: set[int], save_dtype: torch.dtype, cut: Cut) -> list[dict]:
    """Build each shape (prune_one as `cut` says) and measure it on the held-out `rows`; sorted
    by KL. The teacher runs on the rows once for all candidates; a search keeps only the plans
    (the few written are rebuilt), a single shape keeps its model."""
    src = common.shape_of(teacher.config)
    n = src["num_hidden_layers"]
    droppable = [i for i in range(n) if i not in protected]
    state = teacher.state_dict()
    t_hidden = common.final_hiddens(teacher, rows, _BATCH_SIZE) if len(shapes) > 1 else None
    costs, results = {}, []
    for shape in tqdm(shapes, desc="candidates", disable=len(shapes) == 1):
        n_drop = n - shape["num_hidden_layers"]
        if _DEPTH_METRIC == "block" and n_drop and n_drop not in costs:
            costs[n_drop] = block_costs(teacher, rows, _BATCH_SIZE, droppable, n_drop)
            if cut.depth is not None and _DEPTH_RERANK:
                import depth_repair  # only when layers are dropped with REPAIR on
                costs[n_drop] = depth_repair.rerank(teacher, rows, _BATCH_SIZE, costs[n_drop],
                                                    _DEPTH_RERANK, cut.depth, cut.damping)
        layers = choose_layers(scores, _DEPTH_METRIC, n, shape["num_hidden_layers"], protected,
                               costs.get(n_drop))
        t0 = time.time()
        student, plan = prune_one(teacher, scores, shape, layers, save_dtype, cut, state)
        t_slice = time.time() - t0
        metrics = common.evaluate(student, rows, _BATCH_SIZE, teacher=teacher,
                                  teacher_hidden=t_hidden, progress="held-out")
        if not math.isfinite(metrics["kl"]):
            raise RuntimeError(f"KL is {metrics['kl']} for shape {shape}: the slicing is broken")
        results.append({"shape": shape, "plan": plan, "metrics": metrics, "t_slice": t_slice,
                        "params": common.param_count(shape, teacher.config),
                        "model": student if len(shapes) == 1 else None,
                        "t_eval": time.time() - t0 - t_slice})
        del student
    return sorted(results, key=lambda r: r["metrics"]["kl"])


# ---- outputs --------------------------------------------------------------------------------

def prune_record(cfg, model: str, model_id: str, src: dict, res: dict, rank: int, types_: list,
                 before: dict, search: list | None, save_dtype, lat: dict | None = None) -> dict:
    """`pare.json` of one written candidate (distill.py reads it through common.read_record)."""
    plan = res["plan"]
    return {
        "stage": "prune", "source_model": model, "source_fingerprint": model_id,
        "lineage": common.lineage(model, src, model_id, "MODEL"), "scores": cfg.SCORES,
        "config": vars(cfg), "recipe": common.recipe(globals()),
        "source_shape": src, "shape": res["shape"], "rank": rank,
        "layer_types": [types_[i] for i in plan["layers"]],
        "kept": {k: plan[k] for k in ("layers", "hidden", "ffn", "heads", "kv_groups")},
        "repair": plan.get("repair"),
        "latency": lat and {k: lat[k] for k in ("device", "dtype", "workload", "source")} | {
            "candidate": res["latency"]},
        "params": {"before": before["total"], "after": res["params"]["total"],
                   "before_non_embedding": before["non_embedding"],
                   "after_non_embedding": res["params"]["non_embedding"]},
        "metrics": res["metrics"], "search": search, "dtype": str(save_dtype),
        "versions": common.versions(), "created": common.now(),
    }


def print_ranking(results: list[dict]):
    print(f"{'rank':>4} {'hidden':>7} {'ffn':>7} {'heads':>5} {'kv':>3} {'layers':>6} "
          f"{'params':>10} {'KL':>8} {'ppl':>9}")
    for r, res in enumerate(results, 1):
        s, m = res["shape"], res["metrics"]
        print(f"{r:>4} {s['hidden_size']:>7} {s['intermediate_size']:>7} "
              f"{s['num_attention_heads']:>5} {s['num_key_value_heads']:>3} "
              f"{s['num_hidden_layers']:>6} {fmt_params(res['params']['total']):>10} "
              f"{m['kl']:8.4f} {m['student_ppl']:9.3f}")


def downstream(model, tokenizer, suite: dict, who: str) -> dict:
    """{task: accuracy, percent} of `model` on the small downstream suite (benchmarks.py)."""
    import benchmarks
    print(f"downstream: scoring {who} on {', '.join(suite)}")
    return {k: r["primary"] for k, r in benchmarks.score_suite(model, tokenizer, suite,
                                                                _BATCH_SIZE).items()}


def print_summary(src: dict, best: dict, before: dict, written: list, times: dict):
    shape, m, p = best["shape"], best["metrics"], best["params"]
    q_width = shape["num_attention_heads"] * shape["head_dim"]
    short = {"hidden_size": "hidden", "intermediate_size": "ffn", "num_attention_heads": "heads",
             "num_key_value_heads": "kv_heads", "num_hidden_layers": "layers"}
    print("shape: " + ", ".join(f"{v} {src[k]} -> {shape[k]}" for k, v in short.items())
          + f", head_dim {shape['head_dim']}")
    print(f"layers_kept: {best['plan']['layers']}")
    for key, name in (("mlp", "down_proj"), ("attention", "o_proj"), ("depth", "depth")):
        if key in (best["plan"].get("repair") or {}):
            e0, e1 = best["plan"]["repair"][key]
            print(f"repair_{name}: output error {e0:.4f} -> {e1:.4f} (relative, mean over "
                  f"{'dropped runs' if key == 'depth' else 'layers'}, on the calibration tokens)")
    print(f"params: {fmt_params(before['total'])} -> {fmt_params(p['total'])} "
          f"({p['total'] / before['total']:.1%})")
    print(f"params_non_embedding: {fmt_params(before['non_embedding'])} -> "
          f"{fmt_params(p['non_embedding'])} ({p['non_embedding'] / before['non_embedding']:.1%})")
    print(f"vllm_legacy_servable: {'yes' if q_width == shape['hidden_size'] else 'no'} "
          f"(heads * head_dim = {q_width}, hidden {shape['hidden_size']})")
    print(f"teacher_ppl: {m['teacher_ppl']:.4f}")
    print(f"pruned_ppl: {m['student_ppl']:.4f}")
    print(f"kl: {m['kl']:.4f} nats/token on {m['tokens']} held-out tokens")
    print(f"time: load {times['load']:.1f}s, prune+eval {times['prune_and_eval']:.1f}s (slice+build "
          f"{best['t_slice']:.1f}s), save {times['save']:.1f}s")
    print(f"output: {', '.join(str(w) for w in written)}")


# ---- main -----------------------------------------------------------------------------------

def main(argv: list[str]) -> dict:
    cfg = common.configure(globals(), argv)
    check_knobs(cfg)
    scores = load_scores(cfg.SCORES)
    held_out_defaults(cfg, scores["meta"])
    model = common.recorded_name(cfg.MODEL or scores["meta"]["model"])  # as recorded: resolved
    outputs = output_paths(cfg, {"MODEL": model, "SCORES": cfg.SCORES, "DATASET": cfg.DATASET})
    config = common.load_config(model)
    common.family_of(config)
    common.check_positions(config, cfg.SEQ_LEN)
    model_id = common.fingerprint(model)
    check_scores(scores, cfg.SCORES, config, model, model_id)
    src, types_ = common.shape_of(config), common.layer_types(config)
    protected = protected_layers(types_, _KEEP_FULL_ATTENTION)
    if _DEPTH_METRIC == "loss" and not scores["layer_loss"]:
        raise common.UserError(f"_DEPTH_METRIC='loss' needs per-layer losses, but SCORES="
                               f"{cfg.SCORES!r} has none (made with LOSS_SAMPLES=0)")
    device = common.pick_device(cfg.DEVICE)
    dtype = common.pick_dtype(_DTYPE, device)
    save_dtype = (common.pick_dtype(_SAVE_DTYPE, device, "_SAVE_DTYPE") if _SAVE_DTYPE
                  else common.stored_dtype(config, dtype))
    shapes, lat = plan_shapes(cfg, src, config, protected, device, dtype)
    before = common.param_count(src, config)
    grams = open_grams(cfg.SCORES, scores["meta"]) if cfg.REPAIR else None
    if cfg.REPAIR and grams is None:
        print("repair: SCORES has no statistics (made with _GRAM_ROWS=0): slicing only")
    cut = Cut(grouping=_GQA_GROUPING, head_score=_HEAD_SCORE, norm_correction=_NORM_CORRECTION,
              grams=grams, damping=_REPAIR_DAMPING, select=_REPAIR_SELECT, rounds=_REPAIR_ROUNDS)

    tokenizer = common.load_tokenizer(model)
    rows = held_out_rows(cfg, tokenizer, scores["meta"])
    drops = cfg.TARGET_SPEEDUP is not None or any(s["num_hidden_layers"] < src["num_hidden_layers"]
                                                  for s in shapes)
    depth_rows = fit_rows(scores["meta"], tokenizer) if cfg.REPAIR and drops else None
    suite = None
    if _EVAL_TASKS:  # read (and checked) before the model loads
        import benchmarks
        suite = benchmarks.suite_of(_EVAL_TASKS, _EVAL_TASK_DOCS)
    t0 = time.time()
    teacher = common.load_model(model, device, dtype)
    times = {"load": time.time() - t0}
    print(f"model: {config.architectures} on {device} in {dtype}, loaded in {times['load']:.1f}s")
    if depth_rows is not None:
        import depth_repair  # only when layers are dropped with REPAIR on
        cut.depth = depth_repair.stats_source(teacher, depth_rows, _BATCH_SIZE, _DEPTH_CHECK_TOKENS,
                                              cut.memo)
    t0 = time.time()
    results = score_candidates(teacher, scores, shapes, rows, protected, save_dtype, cut)
    times["prune_and_eval"] = time.time() - t0
    search = None
    if lat:
        import latency  # the TARGET_SPEEDUP frontier (latency.py), only in this branch
        latency.add_latency(results, shapes, lat)
        latency.print_table(results, lat["workload"]["batches"], fmt_params)
    if cfg.TARGET_PARAMS is not None or lat:
        print_ranking(results)
        search = [{**r["shape"], "params": r["params"]["total"], **r["metrics"],
                   **({"latency": r["latency"]} if lat else {})} for r in results]

    source_acc = downstream(teacher, tokenizer, suite, "source") if suite else None
    t0 = time.time()
    state = teacher.state_dict()
    for rank, (res, path) in enumerate(zip(results, outputs), 1):
        student = res["model"] or prune_one(  # a search rebuilds the few it writes, one at a time
            teacher, scores, res["shape"], res["plan"]["layers"], save_dtype, cut, state)[0]
        actual = sum(p.numel() for p in student.parameters())
        if actual != res["params"]["total"]:
            print(f"warning: counted {actual} parameters, the formula says {res['params']['total']}")
        record = prune_record(cfg, model, model_id, src, res, rank, types_, before, search,
                              save_dtype, lat)
        if suite:
            res["downstream"] = downstream(student, tokenizer, suite, Path(path).name)
            record["downstream"] = {"source": source_acc, "pruned": res["downstream"]}
        common.write_checkpoint(student, model, path, record, dtype=save_dtype)
        if lat and rank == 1:
            latency.plot_frontier(results, cfg.TARGET_SPEEDUP, lat["workload"]["batches"][0],
                                  path / "latency.png")
        res["model"] = None
        del student
    times["save"] = time.time() - t0
    times["eval"] = sum(r["t_eval"] for r in results)
    print_summary(src, results[0], before, outputs, times)
    if suite:
        from benchmarks import mean_accuracy
        acc = results[0]["downstream"]
        each = ", ".join(f"{k} {acc[k]:.1f} vs {source_acc[k]:.1f}" for k in acc)
        print(f"accuracy: {mean_accuracy(acc):.2f} (source {mean_accuracy(source_acc):.2f}; {each})")
    return {"results": results, "written": outputs, "before": before, "time": times}


if __name__ == "__main__":
    common.run(main)
