"""Depth repair for prune.py: what a dropped run of layers did, folded into the layer before it.

Dropping layers a..b-1 leaves the residual stream without their updates, h_b - h_a. The last
layer kept before the run, p = a-1, writes its MLP output M_p into the stream; the repair refits
that write so that it carries the run's update too: on calibration tokens, M_p' ~ t = M_p + h_b -
h_{p+1} (a linear map fitted by least squares and folded into the down projection: ReplaceMe,
arXiv 2505.02819, kept ~92% of Llama-2-7B's quality with 25% of its layers gone, without training).

- Pre-norm (Llama, Qwen2, Mistral): M_p = W z, z the down projection's input, so W' is the ridge
  solution of min sum ||W' z - t||^2, the width repair's solve with t in place of W z. Exact
  when the run's update is a linear function of z.
- Post-norm (Olmo 2/3): M_p = g * N(W z), an RMSNorm N (nothing learnt inside) then its gain g. N
  fixes each token's magnitude, so no W' can follow t in scale; the gain can, per channel. The
  gain is refit first, g'_c = sum t_c v_c / sum v_c^2 with v = N(W z) (the source's direction),
  then W' to the direction t / g' at the source's pre-norm magnitude rms(W z). Exact when the
  run's update is a per-channel multiple of M_p; the best linear fit through the norm otherwise.

The result is an ordinary checkpoint (new down_proj weights, and for Olmo new gains), so it loads
in transformers and vLLM as is. A fit is kept only where it lowers the relative error ||M' - t||
on calibration tokens it was not fitted on (the width repair likewise keeps only improvements).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common


@dataclass
class RunStats:
    """Calibration statistics of one dropped run: layer `p` kept, layers p+1..end-1 dropped."""
    p: int
    end: int
    gram: torch.Tensor    # sum z z^T, float64 [F, F]
    cross: torch.Tensor   # sum s z t^T, float64 [F, H]; s = rms(W z) post-norm, else 1
    num: torch.Tensor     # post-norm: sum t * v per channel [H] (v = N(W z)); else empty
    den: torch.Tensor     # post-norm: sum v * v per channel [H]
    z: torch.Tensor       # the tokens kept out of the fit for the check: z [T, F], t [T, H]
    t: torch.Tensor


class _Reached(Exception):
    """Raised by a hook once the last dropped layer has run: nothing after it is needed."""


def dropped_runs(layers: list[int], n_layers: int) -> list[tuple[int, int]]:
    """Maximal runs of dropped source layers as (first dropped, one past the last)."""
    runs, start = [], None
    for i in range(n_layers + 1):
        dropped = i < n_layers and i not in layers
        if dropped and start is None:
            start = i
        elif not dropped and start is not None:
            runs.append((start, i))
            start = None
    return runs


def rms(u: torch.Tensor, eps: float) -> torch.Tensor:
    """Each token's root mean square (with the norm's epsilon), as RMSNorm computes it."""
    return torch.sqrt(u.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def gather(model, family: common.Family, rows: torch.Tensor, batch_size: int, p: int, end: int,
           check_tokens: int) -> RunStats:
    """One pass of the source over `rows` (stopped after layer end-1) collecting RunStats. The
    first `check_tokens` tokens (at most a quarter) are kept apart for the check, out of the fit."""
    layers = model.model.layers
    norm = getattr(layers[p], family.mlp_norm) if family.post_norm else None
    grab = {}

    def out_of(o):
        return o[0] if isinstance(o, tuple) else o

    def at_end(mod, args, out):
        grab["h_b"] = out_of(out)
        raise _Reached

    hooks = [layers[p].mlp.down_proj.register_forward_hook(
                 lambda mod, args, out: grab.update(z=args[0], u=out)),
             layers[p].register_forward_hook(lambda mod, args, out: grab.update(h_p1=out_of(out))),
             layers[end - 1].register_forward_hook(at_end)]
    f, h = layers[p].mlp.down_proj.in_features, layers[p].mlp.down_proj.out_features
    device = layers[p].mlp.down_proj.weight.device
    gram = torch.zeros(f, f, dtype=torch.float64, device=device)
    cross = torch.zeros(f, h, dtype=torch.float64, device=device)
    num, den = (torch.zeros(h if norm is not None else 0, dtype=torch.float64, device=device)
                for _ in range(2))
    total = rows.numel()
    check_tokens = min(check_tokens, total // 4)  # always most of the tokens for the fit
    kept_z, kept_t, kept = [], [], 0
    try:
        for ids in tqdm(list(common.batches(rows, batch_size)), desc=f"depth fit {p + 1}-{end - 1}",
                        leave=False):
            try:
                model(input_ids=ids.to(common.input_device(model)), use_cache=False)
            except _Reached:
                pass
            z = grab["z"].flatten(0, -2).double()
            u = grab["u"].flatten(0, -2).double()
            if norm is not None:
                s = rms(u, norm.variance_epsilon)
                v = u / s
                m = norm.weight.double() * v
            else:
                s, m = 1.0, u
            # layers p and end-1 may sit on different GPUs (a model spread by device_map)
            t = (grab["h_b"].to(device) - grab["h_p1"].to(device)).flatten(0, -2).double() + m
            take = max(0, min(check_tokens - kept, len(z)))  # the first tokens: the check's
            if take:
                kept_z.append(z[:take].float().cpu())
                kept_t.append(t[:take].float().cpu())
                kept += take
            z, t = z[take:], t[take:]
            s, v = (s[take:], v[take:]) if norm is not None else (s, None)
            gram += z.T @ z
            cross += z.T @ (s * t)
            if norm is not None:
                num += (t * v).sum(0)
                den += (v * v).sum(0)
    finally:
        for hook in hooks:
            hook.remove()
    return RunStats(p, end, gram, cross, num, den, torch.cat(kept_z), torch.cat(kept_t))


def stats_source(model, rows: torch.Tensor, batch_size: int, check_tokens: int,
                 memo: dict) -> Callable:
    """stats_of(p, end): `gather` over `rows` on the source `model`, once per run of dropped
    layers (kept in `memo`, which prune.py shares between the candidates of a search)."""
    family = common.family_of(model.config)

    def stats_of(p: int, end: int) -> RunStats:
        if ("depth", p, end) not in memo:
            memo["depth", p, end] = gather(model, family, rows, batch_size, p, end, check_tokens)
        return memo["depth", p, end]
    return stats_of


def fit(stats: RunStats, kept: list[int], gain: torch.Tensor | None,
        damping: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(down_proj weight [H, len(kept)] for the kept MLP neurons, post-norm gain [H] or None), or
    None when the ridge system cannot be factored. The ridge is `damping` x the mean diagonal
    of the kept Gram, as in the width repair."""
    K = torch.tensor(kept, device=stats.gram.device)
    G, C = stats.gram[K][:, K], stats.cross[K]
    new_gain = None
    if gain is not None:
        new_gain = stats.num / stats.den.clamp(min=1e-300)
        # a channel the norm never writes to (v = 0 on every token) keeps its gain
        dead = stats.den <= 1e-12 * stats.den.max().clamp(min=1e-300)
        tiny = new_gain.abs() <= 1e-6 * new_gain.abs().max().clamp(min=1e-300)
        new_gain = torch.where(dead | tiny, gain.double().to(new_gain.device), new_gain)
        C = C / new_gain  # sum z u*^T with u* = (t / g') rms(W z)
    lam = damping * G.diagonal().mean().clamp(min=1e-30)
    chol, info = torch.linalg.cholesky_ex(G + lam * torch.eye(len(K), dtype=G.dtype,
                                                              device=G.device))
    if info != 0:
        return None
    A = torch.cholesky_solve(C, chol).T
    if not torch.isfinite(A).all() or (new_gain is not None and not torch.isfinite(new_gain).all()):
        return None
    return A, new_gain


def check_error(stats: RunStats, kept: list[int], hidden: list[int], weight: torch.Tensor,
                gain: torch.Tensor | None, eps: float) -> float:
    """Relative error sum ||M' - t||^2 / sum ||t||^2 on the tokens kept out of the fit, where M' is the
    pruned layer writes: weight [H', K] on the kept neurons' z, through the post-norm gain [H']
    (over the kept hidden channels H', as the pruned model computes it) when there is one."""
    z = stats.z[:, kept].double()
    t = stats.t[:, hidden].double()
    m = z @ weight.double().cpu().T
    if gain is not None:
        m = gain.double().cpu() * m / rms(m, eps)
    return (((m - t) ** 2).sum() / (t ** 2).sum().clamp(min=1e-300)).item()


def best_fold(stats: RunStats, kept: list[int], hidden: list[int], weight: torch.Tensor,
              gain: torch.Tensor | None, source_gain: torch.Tensor | None, damping: float,
              gain_scale: float, eps: float) -> tuple:
    """(weight, gain, error as cut, error after) for the layer before a run, as it is cut
    (`weight` [H', K], `gain` [H'] or None) or refit: the best on the check tokens of the layer as
    cut, the refit down_proj (with its refit gain) and, post-norm, the refit gain alone (on few
    tokens the gain, H numbers, can generalise where the H x K map overfits). The refit gain is
    `source_gain`'s refit, sliced to `hidden` and scaled by `gain_scale` as the cut's gains are."""
    options = [(weight, gain)]
    result = fit(stats, kept, source_gain, damping)
    if result is not None:
        A, g = result
        A = A[torch.tensor(hidden, device=A.device)]
        g = g[torch.tensor(hidden, device=g.device)] * gain_scale if g is not None else None
        options += [(A, g)] + ([(weight, g)] if g is not None else [])
    errors = [check_error(stats, kept, hidden, w, g, eps) for w, g in options]
    best = min(range(len(options)), key=lambda i: (errors[i], i))  # ties: as cut
    return (*options[best], errors[0], errors[best])


def repair(sliced: dict, plan: dict, source: dict, n_layers: int, family: common.Family, stats_of,
           damping: float, gain_scale: float, eps: float) -> tuple[float, float] | None:
    """Fold each dropped run into the kept layer before it, in the sliced state dict (new
    numbering). `stats_of(p, end)` gives a run's RunStats; `source` is the source's state dict
    (for the post-norm gains) with `n_layers` layers. Returns the mean relative error over the
    runs (before, after), or None when no run has a kept layer before it (a run starting at
    layer 0 is left as cut)."""
    layers, hidden, errors = plan["layers"], plan["hidden"], []
    for start, end in dropped_runs(layers, n_layers):
        p = start - 1
        if p < 0:
            print(f"depth repair: layers {start}-{end - 1} have no layer before them; left as cut")
            continue
        new = layers.index(p)
        w_key = f"model.layers.{new}.mlp.down_proj.weight"
        g_key = f"model.layers.{new}.{family.mlp_norm}.weight" if family.post_norm else None
        gain = source[f"model.layers.{p}.{family.mlp_norm}.weight"] if family.post_norm else None
        w, g, before, after = best_fold(stats_of(p, end), plan["ffn"][new], hidden, sliced[w_key],
                                        sliced[g_key] if g_key else None, gain, damping,
                                        gain_scale, eps)
        sliced[w_key] = w.to(sliced[w_key])
        if g_key:
            sliced[g_key] = g.to(sliced[g_key])
        errors.append((before, after))
    if not errors:
        return None
    return sum(e[0] for e in errors) / len(errors), sum(e[1] for e in errors) / len(errors)


@torch.no_grad()
def repaired_skip_loss(model, family: common.Family, rows: torch.Tensor, batch_size: int,
                       dropped: list[int], stats_of, damping: float) -> float:
    """Loss on `rows` with the layers `dropped` skipped and each run's repair (at full width, as
    `best_fold` chooses it) patched into the model for the measurement, then put back: what the
    repair makes of that choice of layers."""
    layers = model.model.layers
    n = len(layers)
    saved = []
    try:
        for start, end in dropped_runs([i for i in range(n) if i not in dropped], n):
            if start == 0:
                continue
            layer = layers[start - 1]
            w = layer.mlp.down_proj.weight
            norm = getattr(layer, family.mlp_norm) if family.post_norm else None
            gain = norm.weight if norm is not None else None
            new_w, new_g, _, _ = best_fold(stats_of(start - 1, end), list(range(w.shape[1])),
                                           list(range(w.shape[0])), w, gain, gain, damping, 1.0,
                                           norm.variance_epsilon if norm is not None else 0.0)
            saved.append((w, w.detach().clone()))
            w.copy_(new_w.to(w))
            if norm is not None:
                saved.append((norm.weight, norm.weight.detach().clone()))
                norm.weight.copy_(new_g.to(norm.weight))
        return common.skip_loss(model, rows, batch_size, dropped)
    finally:
        for param, value in saved:
            param.copy_(value)


def rerank(model, rows: torch.Tensor, batch_size: int, costs: dict, k: int, stats_of,
           damping: float) -> dict:
    """prune.py's block costs {run: loss} with its k cheapest runs measured again with the repair
    patched in (and the rest left out): the run the repair compensates best may not be the one
    cheapest to skip as it is."""
    family = common.family_of(model.config)
    cheapest = sorted(costs, key=costs.get)[:k]
    new = {run: repaired_skip_loss(model, family, rows, batch_size, list(run), stats_of, damping)
           for run in tqdm(cheapest, desc="block cost with the depth repair")}
    plain, best = min(costs, key=costs.get), min(new, key=new.get)
    print(f"depth: skipping {list(best)} costs {new[best]:.4f} with the repair (without: "
          f"{costs[best]:.4f}); the cheapest without it, {list(plain)}, {new[plain]:.4f} with it")
    return new
