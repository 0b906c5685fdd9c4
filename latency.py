"""prune.py's TARGET_SPEEDUP search: each candidate shape's prefill and decode timed on this device
(random weights: the time does not depend on the values), the measurements cached next to OUTPUT,
and the (speed-up, KL) frontier of the ranked candidates as a table and `latency.png`.
prune.py imports it only when TARGET_SPEEDUP is set and passes its _LATENCY_* recipe constants.
"""

import inspect
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common


# ---- timing ---------------------------------------------------------------------------------

def workload(config, prompt: int, new_tokens: int, batches, warmup: int, repeats: int) -> dict:
    """The timed workload (prune.py's _LATENCY_* constants), checked to fit MODEL's context."""
    need = prompt + new_tokens
    if need > config.max_position_embeddings:
        raise common.UserError(f"the latency workload (_LATENCY_PROMPT + _LATENCY_NEW_TOKENS = "
                               f"{need} tokens) is longer than MODEL's context "
                               f"({config.max_position_embeddings}); lower them in prune.py")
    return {"prompt": prompt, "new_tokens": new_tokens, "batches": list(batches),
            "warmup": warmup, "repeats": repeats}


def measure_latency(config, device: str, dtype: torch.dtype, work: dict) -> dict:
    """Milliseconds of the workload on a model of `config` with random weights: one prefill
    forward of work["prompt"] tokens (only the last position's logits, as a server computes)
    and work["new_tokens"] greedy decode steps with the KV cache, per batch size; the median of
    the timed repeats, CUDA synchronised. The one place that times a shape: an engine-specific
    measurement (e.g. vLLM's) would replace this function.
    Returns {"prefill_ms": {batch: ms}, "decode_ms": {batch: ms per token}}."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    torch.manual_seed(0)
    with torch.device(device), no_init_weights():  # transformers' init is slow; values do not matter
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # finite values like a trained model's: matrices small, norm gains 1
        for t in model.parameters():
            t.normal_(0, 0.02) if t.dim() > 1 else t.fill_(1.0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # the KV cache's name: `cache` from transformers 5.2x, `past_key_values` before
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = {"prefill_ms": {}, "decode_ms": {}}
    for b in work["batches"]:
        ids = torch.randint(config.vocab_size, (b, work["prompt"]), device=device)

        def once():
            with torch.no_grad():
                sync()
                t0 = time.perf_counter()
                o = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                sync()
                t1 = time.perf_counter()
                for _ in range(work["new_tokens"]):
                    nxt = o.logits[:, -1:].argmax(-1)
                    o = model(input_ids=nxt, use_cache=True, **{cache: getattr(o, cache)})
                sync()
                return t1 - t0, (time.perf_counter() - t1) / max(work["new_tokens"], 1)
        for _ in range(work["warmup"]):
            once()
        runs = [once() for _ in range(work["repeats"])]
        out["prefill_ms"][str(b)] = 1e3 * statistics.median(r[0] for r in runs)
        out["decode_ms"][str(b)] = 1e3 * statistics.median(r[1] for r in runs)
    return out


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model, instruction set torch uses and thread count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads")


# ---- the cache ------------------------------------------------------------------------------

def latency_key(config, device: str, dtype: torch.dtype, work: dict) -> str:
    """What a measurement depends on: device, dtype, library versions, workload and shape."""
    c = config.to_dict()
    arch = {k: c.get(k) for k in ("model_type", "vocab_size", "tie_word_embeddings",
                                  "sliding_window", "layer_types", *common.SHAPE_KEYS)}
    return json.dumps({"device": device_name(device), "dtype": str(dtype),
                       "torch": torch.__version__, "transformers": common.versions()["transformers"],
                       "workload": work, "shape": arch}, sort_keys=True)


def read_latency_cache(path: Path) -> dict:
    """{key: measurement} of prune.py's latency cache (empty when there is none yet)."""
    if not path.exists():
        return {}
    what, fix = "prune.py latency cache", ("move it away (prune.py keeps its measurements there, "
                                           "next to OUTPUT)")
    data = common.read_json(path, what, required=("entries",), stage="latency-cache", fix=fix)
    if not isinstance(data["entries"], dict):
        raise common.UserError(f"{path} is not a {what}; {fix}")
    return dict(data["entries"])


def write_latency_cache(path: Path, entries: dict):
    text = json.dumps({"stage": "latency-cache", "entries": entries}, indent=1, sort_keys=True)
    common.write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def measure_shapes(configs: list, device: str, dtype: torch.dtype, work: dict,
                   cache_path: Path) -> tuple[dict, list[dict]]:
    """(the measurement of `configs[0]`, the source's, and one per other config), each from the
    cache when it holds one; new measurements are added to the cache as they finish."""
    cache = read_latency_cache(cache_path)
    keys = [latency_key(c, device, dtype, work) for c in configs]
    missing = [k for k in dict.fromkeys(keys) if k not in cache]
    print(f"latency: {len(set(keys))} shapes, {len(set(keys)) - len(missing)} from {cache_path}, "
          f"measuring {len(missing)} on {device_name(device)} in {dtype}")
    for c, k in tqdm(list(zip(configs, keys)), desc="latency", disable=not missing):
        if k not in cache:
            cache[k] = measure_latency(c, device, dtype, work)
            write_latency_cache(cache_path, cache)
    return cache[keys[0]], [cache[k] for k in keys[1:]]


# ---- the search -----------------------------------------------------------------------------

def speedup(source: dict, candidate: dict, batch: int) -> float:
    """Decode time of the source / the candidate's, at batch size `batch`."""
    return source["decode_ms"][str(batch)] / candidate["decode_ms"][str(batch)]


def speed_window(shapes: list[dict], configs: list, device: str, dtype: torch.dtype, work: dict,
                 cache_path: Path, target: float, tolerance: float, k: int,
                 budget: float | None) -> tuple[list[dict], dict]:
    """Latency prunes prune.py's grid `shapes` first (timed as `configs`: the source's, then one
    per shape; no weights needed): (the shapes that meet `target`, up to `tolerance` beyond it,
    for prune.py to spread `k` candidates over; the latencies: {"source": measurement,
    "device", "dtype", "workload"}). Each shape gets its "latency", with "speedup". `budget`:
    TARGET_PARAMS, which the grid is already under (for the message)."""
    source, measured = measure_shapes(configs, device, dtype, work, cache_path)
    for s, m in zip(shapes, measured):
        s["latency"] = {**m, "speedup": speedup(source, m, work["batches"][0])}
    meet = [s for s in shapes if s["latency"]["speedup"] >= target]
    if not meet:
        best = max((s["latency"]["speedup"] for s in shapes), default=1.0)
        raise common.UserError(f"no candidate on the grids reaches TARGET_SPEEDUP={target:g} on "
                               f"this device (the fastest: {best:.2f}x"
                               f"{' under TARGET_PARAMS' if budget else ''}); lower it")
    window = [s for s in meet if s["latency"]["speedup"] <= target * (1 + tolerance)]
    window = window or sorted(meet, key=lambda s: s["latency"]["speedup"])[:k]
    print(f"latency: {len(meet)} of {len(shapes)} shapes reach {target:g}x decode speed-up; "
          f"scoring {min(k, len(window))} from {len(window)} within {tolerance:.0%} of it")
    return window, {"source": source, "device": device_name(device), "dtype": str(dtype),
                    "workload": work}


# ---- the frontier ---------------------------------------------------------------------------

def frontier(points: list[tuple[float, float]]) -> list[bool]:
    """Which (speed-up, KL) points no other point beats: as fast or faster with lower or equal
    KL, better in one of the two."""
    return [not any(s2 >= s and k2 <= k and (s2 > s or k2 < k) for s2, k2 in points)
            for s, k in points]


def add_latency(results: list[dict], shapes: list[dict], lat: dict):
    """Each result's measured latency (lat["shapes"] follows `shapes`) and whether it is on the
    (speed-up, KL) frontier of the ranked candidates."""
    by_shape = {json.dumps(s, sort_keys=True): m for s, m in zip(shapes, lat["shapes"])}
    for r in results:
        r["latency"] = dict(by_shape[json.dumps(r["shape"], sort_keys=True)])
    on = frontier([(r["latency"]["speedup"], r["metrics"]["kl"]) for r in results])
    for r, f in zip(results, on):
        r["latency"]["frontier"] = f


def print_table(results: list[dict], batches: list, fmt_params):
    """The ranked candidates by speed-up: times per batch size in `batches`, KL, frontier
    (parameter counts as prune.py's `fmt_params` writes them)."""
    bs = [str(b) for b in batches]
    print(f"{'hidden':>7} {'ffn':>6} {'heads':>5} {'layers':>6} {'params':>9} "
          + " ".join(f"{f'prefill@{b}':>10}" for b in bs) + " "
          + " ".join(f"{f'decode@{b}':>9}" for b in bs) + f" {'speedup':>7} {'KL':>8} frontier")
    for r in sorted(results, key=lambda r: -r["latency"]["speedup"]):
        s, lat = r["shape"], r["latency"]
        print(f"{s['hidden_size']:>7} {s['intermediate_size']:>6} {s['num_attention_heads']:>5} "
              f"{s['num_hidden_layers']:>6} {fmt_params(r['params']['total']):>9} "
              + " ".join(f"{lat['prefill_ms'][b]:>8.2f}ms" for b in bs) + " "
              + " ".join(f"{lat['decode_ms'][b]:>7.3f}ms" for b in bs)
              + f" {lat['speedup']:>6.2f}x {r['metrics']['kl']:>8.4f} "
              f"{'yes' if lat['frontier'] else ''}")


def plot_frontier(results: list[dict], target: float, batch: int, path: Path):
    """KL against decode speed-up (at batch size `batch`) of the ranked candidates: the frontier
    and the chosen one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["latency"]["speedup"] for r in results]
    ax.scatter(xs, [r["metrics"]["kl"] for r in results], c="0.6", label="candidates")
    front = sorted((r["latency"]["speedup"], r["metrics"]["kl"]) for r in results
                   if r["latency"]["frontier"])
    ax.plot(*zip(*front), "-o", c="tab:blue", label="frontier")
    ax.scatter([results[0]["latency"]["speedup"]], [results[0]["metrics"]["kl"]], marker="*",
               s=200, c="tab:red", zorder=3, label="chosen")
    ax.axvline(target, ls="--", c="0.4", label=f"target {target:g}x")
    ax.set_xlabel(f"decode speed-up at batch {batch} (source / candidate)")
    ax.set_ylabel("held-out KL(source || candidate), nats/token")
    ax.legend()
    fig.tight_layout()
    common.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
