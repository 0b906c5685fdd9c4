"""Stage 3 of Pare: recover a pruned student by distilling the teacher's logits (Minitron).

    uv run distill.py                                       # out/pruned -> out/distilled
    uv run distill.py DATASET=notes.txt SEQ_LEN=256 GLOBAL_BATCH=8 MAX_STEPS=100
    uv run accelerate launch --num_processes 8 distill.py    # 8 GPUs (DDP), same knobs
    uv run accelerate launch --num_processes 8 distill.py FSDP=True   # both models sharded
    uv run distill.py STUDENT="['out/pruned', 'out/pruned-2']"     # select, then the winner
    uv run distill.py TEACHER=allenai/Olmo-3-32B-Instruct TEACHER_CACHE=out/cache   # top-k cache
    uv run distill.py STUDENT=out/distilled ON_POLICY=1.0 DIVERGENCE=reverse_kl   # on-policy

Trains STUDENT (prune.py's output; its `pare.json` names the teacher unless TEACHER is set) on
DATASET packed to SEQ_LEN, with forward KL(teacher || student) on the logits at temperature 1
and no cross-entropy (P1 Tables 15-16), computed a chunk of tokens at a time so full-vocabulary
logits never exist for the whole batch; plus a cosine loss on mapped hidden states when the
depth cut is large. AdamW, warmup then cosine decay, GLOBAL_BATCH rows per step over all
processes and accumulation. Checkpoints (also on the first Ctrl-C or SIGTERM) resume with the
same losses when the same command runs again. Writes OUTPUT, an HF directory whose `pare.json`
extends the student's with a "distill" entry. Several STUDENTs: each is distilled briefly and
the better ones longer (a funnel by held-out KL), and the best goes on as the run. With
TEACHER_CACHE, the teacher's TOPK log-probabilities per token are computed once into it (first
run) and training reads them instead of running the teacher (KL over the top k plus the rest).
ON_POLICY: that share of the steps trains on the student's own continuations of DATASET's
prompts, scored by the teacher (GKD), with DIVERGENCE forward KL, reverse KL or JSD.
"""

import contextlib
import hashlib
import json
import math
import pickle
import resource
import shutil
import signal
import time
import types
from pathlib import Path

import torch
from tqdm import tqdm

import common

# ---- knobs: per run, `NAME=value` on the command line --------------------------------------
STUDENT: str | list = "out/pruned"     # directory prune.py wrote; a list of them: pick the best
SELECT_TOKENS = 20_000_000             # with several STUDENTs: tokens per candidate, first round
TEACHER: str | None = None             # hub id or directory; None: the source in STUDENT's pare.json
TEACHER_CACHE: str | None = None       # directory of the teacher's top-k log-probs (filled once)
TOPK = 64                              # with TEACHER_CACHE: the teacher's most likely tokens kept per token
ON_POLICY = 0.0                        # share of steps on the student's samples (GKD's lambda); 0: none
DIVERGENCE = "forward_kl"              # 'forward_kl' (Minitron), 'reverse_kl' (on-policy recipe) or 'jsd'
DATASET = "allenai/Dolci-Instruct-SFT" # hub dataset (messages/text column) or local .txt/.jsonl/.parquet
EVAL_SAMPLES = 32                      # held-out rows (the first rows of DATASET, never trained on); 0: none
SEQ_LEN = 4096                         # tokens per packed row
BATCH_SIZE = 4                         # rows per forward/backward (micro-batch) on each process
GLOBAL_BATCH = 256                     # rows per optimizer step, all processes and accumulation
LR = 1e-4                              # peak learning rate (Minitron: 1e-4)
MAX_STEPS: int | None = None           # optimizer steps; None: _TOTAL_TOKENS / tokens per step
DEVICE: str | None = None              # 'cuda', 'cpu'; None: cuda when available
FSDP = False                           # shard student and teacher over the processes (FSDP2)
GRADIENT_CHECKPOINTING = False         # recompute the student's activations in backward (saves memory)
OUTPUT = "out/distilled"               # final HF directory; checkpoints go to OUTPUT-checkpoints

# ---- recipe: edit here to experiment, not per run (recorded in progress.json and pare.json) --
# Minitron P1 (arXiv 2407.14679) sec. 4 and P2 (arXiv 2408.11796).
_TOTAL_TOKENS = 2_500_000_000          # default schedule length (P2: most recovery by ~2.5B tokens)
_MIN_LR = 1e-5                         # floor of the cosine decay (Minitron: 1e-4 -> 1e-5)
_WARMUP_STEPS = 50                     # linear warmup (Minitron: 40-100), at most a tenth of the run
_BETA2 = 0.95                          # AdamW second-moment decay (Minitron)
_WEIGHT_DECAY = 0.0                    # AdamW decoupled weight decay (none: stay near the teacher)
_GRAD_CLIP = 1.0                       # max global gradient norm (Minitron: 1.0)
_TEMPERATURE = 1.0                     # softmax temperature of the KL term (Minitron: 1)
_KL_WEIGHT = 1.0                       # logits-only KLD beat CE+KLD (P1 Table 15); bench/ sets
_CE_WEIGHT = 0.0                       # _KL_WEIGHT=0, _CE_WEIGHT=1 for a plain fine-tuning baseline
_HIDDEN_LOSS_DEPTH_CUT = 0.3           # add the hidden-state loss when this share of layers was cut
_HIDDEN_LOSS_LAYERS = 4                # student layers mapped to teacher layers (plus embeddings)
_ABORT_LOSS_FACTOR = 10.0              # stop when the loss exceeds this x the run's first loss
_CHUNK_TOKENS = 1024                   # tokens whose full-vocabulary logits exist at once
_EVAL_DATASET = None                   # held-out data from elsewhere; None: the first rows of DATASET
_EVAL_EVERY = 200                      # steps between held-out evaluations (and at start and end)
_LOG_EVERY = 1                         # steps between log lines
_CHECKPOINT_EVERY = 500                # steps between checkpoints; 0: only at a stop
_KEEP_CHECKPOINTS = 2                  # most recent checkpoints kept
_STOP_AT_STEP = None                   # stop after this step with a checkpoint (a time-limited job)
_PEAK_TFLOPS = None                    # dense bf16 peak per device for MFU; None: known GPUs only
_DTYPE = None                          # teacher dtype; None: bfloat16 on GPU, float32 on CPU
_SEED = 0                              # data shuffling and the hidden-state map's init
# On-policy steps (ON_POLICY): the student continues prompts of DATASET, sampling with the KV
# cache; teacher and student then score the whole row and only the sampled tokens carry loss.
_GEN_TEMPERATURE = 1.0                 # sampling temperature (1: the student's own distribution)
_PROMPT_SHARE = 0.5                    # a text document's prompt: its first share x SEQ_LEN tokens
_JSD_BETA = 0.5                        # DIVERGENCE='jsd': the mixture's teacher weight (GKD: 0.5)
# The teacher cache (TEACHER_CACHE): int32 ids and 16-bit log-probabilities are 6 bytes a kept
# logit (DistillKit stores k = 128 at ~300 bytes per token, with a compressed tail).
_CACHE_DTYPE = "float16"               # stored log-probabilities: float16, bfloat16 or float32
_CACHE_SHARD_ROWS = 64                 # rows per cache file (64 x 4096 tokens at k = 64: ~100 MB)
# Selection between several students (Minitron best practice 9: rank pruned candidates after a
# short retraining, not zero-shot; P1 Figure 9). A funnel, i.e. successive halving (Jamieson and
# Talwalkar, arXiv 1502.07943): after each round the better part by held-out KL goes on, with
# _SELECT_GROWTH x the previous round's tokens, until one is left.
_SELECT_KEEP = 0.5                     # share of the candidates kept after a round (rounded up)
_SELECT_GROWTH = 2                     # tokens of a round / tokens of the round before
_SELECT_FLAT = False                   # every candidate runs every round (the flat search; bench/)

# Settings that may change between a run and its resumption (they do not change the losses).
RESUMABLE = {"OUTPUT", "SELECT_TOKENS", "DEVICE", "FSDP", "_EVAL_EVERY", "_LOG_EVERY", "_CHECKPOINT_EVERY",
             "_KEEP_CHECKPOINTS", "_STOP_AT_STEP", "_PEAK_TFLOPS"}  # FSDP: checked as the format
PROGRESS_KEYS = ("format", "step", "tokens", "world", "fsdp", "data", "ref_loss", "start",
                 "settings", "student", "teacher", "scheduler")


# ---- the loss -------------------------------------------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")  # DIVERGENCE's values

class ChunkedDistillLoss(torch.autograd.Function):
    """Logit loss of N tokens with full-vocabulary logits for only `chunk` tokens at a time.

    loss = (kl_w * T^2 * sum KL(q_t || softmax(z_s/T)) + ce_w * sum CE(z_s, y)) / N (or another
    `divergence` than this forward KL: `student_side_divergence`) with
    z_s = h_s @ W_s^T. The teacher `q_t` is ("logits", h_t, W_t): softmax(h_t @ W_t^T / T), or
    ("topk", ids, logp, rest) from a teacher cache: its top-k log-probabilities plus one bucket
    for the rest (see `topk_kl`); None when only CE is trained. The gradient w.r.t. the
    student's logits is known in closed form, (kl_w * T * (p_s - target) + ce_w * (softmax(z_s)
    - onehot(y))) / N, so each chunk's gradients w.r.t. h_s and W_s are computed in forward and
    the chunk's logits freed; backward only scales them. Also returns (non-differentiable)
    summed KL and CE for logging.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, teacher, labels, temperature, kl_w, ce_w, chunk, divergence):
        n = h_s.shape[0]
        wide = torch.promote_types(h_s.dtype, torch.float32)  # logits: float32 (float64 in tests)
        w_sc = w_s.to(h_s.dtype)
        if teacher is not None and teacher[0] == "logits":
            teacher = ("logits", teacher[1], teacher[2].to(teacher[1].dtype))
        grad_h = torch.empty_like(h_s)
        grad_w = torch.zeros(w_s.shape, dtype=wide, device=w_s.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        # one scale for the chunk's gradient, applied to the small matmul outputs, not to logits
        scale = (kl_w * temperature if kl_w else ce_w) / n
        for i in range(0, n, chunk):
            hs, y = h_s[i:i + chunk], labels[i:i + chunk]
            z_s = (hs @ w_sc.T).to(wide)
            ls1 = z_s.log_softmax(-1)                     # temperature 1: for CE
            ce_sum += -ls1.gather(1, y[:, None]).sum(dtype=torch.float64)
            grad = None
            if kl_w:                                      # grad: p_s - target at temperature T
                ls = ls1 if temperature == 1 else (z_s / temperature).log_softmax(-1)
                pt = None  # the target distribution of a forward KL
                if teacher[0] == "topk":
                    kl, pt = topk_kl(ls, *(t[i:i + chunk] for t in teacher[1:]), target=True)
                else:
                    z_t = (teacher[1][i:i + chunk] @ teacher[2].T).to(wide)
                    lt = (z_t if temperature == 1 else z_t / temperature).log_softmax(-1)
                    del z_t
                    if divergence == "forward_kl":
                        pt = lt.exp()
                        kl = torch.dot(pt.flatten(), lt.sub_(ls).flatten()).double()  # lt spent
                    else:
                        kl, grad = student_side_divergence(ls, lt, divergence)
                    del lt
                kl_sum += kl
                if pt is not None:
                    grad = (ls.exp() if ls is ls1 and ce_w else ls.exp_()).sub_(pt)
                del pt, ls
            del z_s
            if ce_w:                                      # grad: softmax(z_s) - onehot(y)
                p1 = ls1.exp_()                           # in place: ls1 is spent
                p1[torch.arange(len(y), device=y.device), y] -= 1
                grad = p1 if grad is None else grad.add_(p1, alpha=ce_w / (kl_w * temperature))
            del ls1
            grad = grad.to(hs.dtype)
            grad_h[i:i + chunk] = (grad @ w_sc).mul_(scale)
            grad_w.add_(grad.T @ hs, alpha=scale)         # bf16 product on GPU, like autocast's
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        loss = (kl_w * temperature ** 2 * kl_sum + ce_w * ce_sum) / n
        stats = torch.stack([kl_sum, ce_sum])
        ctx.mark_non_differentiable(stats)
        return loss.to(wide), stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.w_dtype),
                None, None, None, None, None, None, None)


def student_side_divergence(ls, lt, divergence: str):
    """Summed divergence of N tokens between the student's and the teacher's log-probabilities
    `ls`, `lt` [N, vocab] (at the loss's temperature), and its gradient w.r.t. the student's
    (tempered) logits. "reverse_kl": KL(student || teacher), the on-policy recipe's choice
    (mode-seeking). "jsd": GKD's generalized Jensen-Shannon divergence (arXiv 2306.13649, eq. 3)
    beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s, beta = _JSD_BETA. Both
    have the form c KL(s || r) + const. in the student's logits z, with r = t (c = 1) or m (c =
    1 - beta; m's own dependence on z cancels), so d/dz = c p_s (log p_s - log r - KL(s || r)).
    """
    ps = ls.exp()
    if divergence == "reverse_kl":
        ref, c = lt, 1.0
    else:
        ref, c = torch.logaddexp(lt + math.log(_JSD_BETA), ls + math.log(1 - _JSD_BETA)), 1 - _JSD_BETA
    diff = ls - ref
    to_ref = (ps * diff).sum(-1, keepdim=True)          # KL(s || r) per token
    value = to_ref.sum(dtype=torch.float64)
    if divergence == "jsd":
        value = (1 - _JSD_BETA) * value + _JSD_BETA * (lt.exp() * (lt - ref)).sum(dtype=torch.float64)
    return value, diff.sub_(to_ref).mul_(ps).mul_(c)


def topk_kl(ls, ids, logp, rest, target: bool = False):
    """Summed KL(teacher || student) over the teacher's top-k support plus one "rest" bucket.

    `ls`: the student's log-probabilities [n, vocab]; `ids`, `logp` [n, k]: the teacher's top-k
    token ids and log-probabilities; `rest` [n]: the log of the teacher's remaining mass. The
    student's distribution is bucketed the same way (its probabilities at `ids`, and the rest
    of its mass in one bucket), so this is a true KL between two distributions on k + 1 outcomes:
    it never exceeds the full-vocabulary KL and equals it when k = vocab (cached top-k KL without
    the missing mass is biased; arXiv 2503.16870). With `target`, also the dense distribution
    whose difference to p_s is the gradient w.r.t. the student's logits: the teacher's
    probabilities on the support, and outside it the student's own, rescaled to the teacher's
    rest mass (derivative of the rest bucket's term).
    """
    logp, rest = logp.to(ls.dtype), rest.to(ls.dtype)
    ids = ids.long()
    q = logp.exp()
    kl = torch.dot(q.flatten(), (logp - ls.gather(1, ids)).flatten()).double()
    ls_rest = ls.scatter(1, ids, -math.inf).logsumexp(-1)   # -inf when k = vocab
    has_rest = rest > -math.inf
    kl = kl + torch.where(has_rest, rest.exp() * (rest - ls_rest), 0.0).sum(dtype=torch.float64)
    if not target:
        return kl, None
    shift = torch.where(has_rest, rest - ls_rest, -math.inf)   # log(q_rest / p_rest)
    dense = (ls + shift[:, None]).exp_().scatter_(1, ids, q)   # in log space: no 0 x inf
    return kl, dense


def logit_loss(h_s, w_s, teacher, labels, temperature=1.0, kl_w=1.0, ce_w=0.0, chunk=1024,
               divergence="forward_kl"):
    """Chunked logit loss of flattened tokens: (scalar loss, [divergence sum, ce_sum]) over N
    tokens. `teacher`: ("logits", h_t, w_t), ("topk", ids, logp, rest) or None (see
    ChunkedDistillLoss); `divergence`: DIVERGENCE (a teacher cache: forward_kl only)."""
    return ChunkedDistillLoss.apply(h_s, w_s, teacher, labels, float(temperature), float(kl_w),
                                    float(ce_w), int(chunk), divergence)


def direct_logit_loss(h_s, w_s, h_t, w_t, labels, temperature=1.0, kl_w=1.0, ce_w=0.0):
    """The same loss with full logits and plain autograd (the reference the tests compare to)."""
    wide = torch.promote_types(h_s.dtype, torch.float32)
    z_s, z_t = (h_s @ w_s.T).to(wide), (h_t @ w_t.T).to(wide)
    ls, lt = (z_s / temperature).log_softmax(-1), (z_t / temperature).log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(z_s, labels)
    return kl_w * temperature ** 2 * kl + ce_w * ce


def hidden_pairs(kept: list[int], n_source: int, n_teacher: int, n_layers: int) -> list[tuple]:
    """(student, teacher) hidden-state indices (0: the embedding output, i: the output of decoder
    layer i - 1, as in `output_hidden_states`): the embeddings (0, 0), then the
    outputs of up to `n_layers` student layers, evenly spaced, each paired with the teacher
    layer it was cut from (`kept` source indices, rescaled when the teacher is deeper or
    shallower than the source). The student's last layer is excluded: the logit loss covers it.
    """
    n = len(kept)
    candidates = list(range(n - 1))
    if n_layers < len(candidates):
        step = len(candidates) / n_layers
        candidates = sorted({candidates[min(len(candidates) - 1, round((k + 1) * step) - 1)]
                             for k in range(n_layers)})
    pairs = [(0, 0)]
    for j in candidates:
        t = round((kept[j] + 1) * n_teacher / n_source) - 1
        pairs.append((j + 1, t + 1))
    return pairs


def use_hidden_loss(n_student: int, n_teacher: int, depth_cut: float) -> bool:
    """True when the student lost at least `depth_cut` of the teacher's layers."""
    return 1 - n_student / n_teacher >= depth_cut - 1e-9


def cosine_loss(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(h_s, h_t), in float32."""
    return (1 - torch.nn.functional.cosine_similarity(h_s.float(), h_t.float(), dim=-1)).mean()


class Distiller(torch.nn.Module):
    """The student and the shared hidden-state map as one module, so that DDP synchronises every
    trainable weight; `forward` is one micro-batch's loss given the teacher's outputs."""

    def __init__(self, student, proj, pairs, settings: dict):
        super().__init__()
        self.student, self.proj, self.pairs, self.settings = student, proj, pairs, settings

    def forward(self, ids, target, t_states, mask=None):
        """Loss of one micro-batch `ids` given the teacher's targets for its predicted tokens
        (`logit_loss`'s `teacher`: from its final hidden states and lm_head, or from a cache;
        None when only CE is trained) and its hidden states at the paired indices `t_states`.
        `mask` [rows, SEQ_LEN - 1]: the predictions that carry loss (an on-policy row's sampled
        tokens; None: all)."""
        s = self.settings
        with hidden_states(self.student, [i for i, _ in self.pairs]) as s_states:
            out = self.student.model(input_ids=ids, use_cache=False)
        h_s = out.last_hidden_state[:, :-1].flatten(0, 1)
        labels = ids[:, 1:].flatten()
        keep = mask.flatten() if mask is not None else slice(None)
        if mask is not None and target is not None:
            target = (target[0], target[1][keep], *target[2:])
        loss, stats = logit_loss(h_s[keep], self.student.lm_head.weight, target, labels[keep],
                                 s["temperature"], s["kl_w"], s["ce_w"], s["chunk"],
                                 s["divergence"])
        hid = torch.zeros((), device=loss.device)
        if self.pairs:
            def at(h):  # the positions that predict a token carrying loss
                return h if mask is None else h[:, :-1][mask]
            hid = sum(cosine_loss(self.proj(at(s_states[i])), at(t_states[j]))
                      for i, j in self.pairs) / len(self.pairs)
            # Minitron: the intermediate loss is rescaled to the logit loss's magnitude
            loss = loss + hid * (loss.detach() / hid.detach().clamp(min=1e-8))
        return loss, stats, hid.detach(), len(labels[keep])

    def held_out(self, rows, batch_size, teacher, chunk, cache=None):
        """common.evaluate on the student, or cached_evaluate with a teacher `cache` (a method,
        so that FSDP can gather it for the call)."""
        if cache is not None:
            return cached_evaluate(self.student, rows, batch_size, cache.held_out(rows), chunk)
        return common.evaluate(self.student, rows, batch_size, teacher, chunk)


@contextlib.contextmanager
def hidden_states(model, indices):
    """Collect `model`'s hidden states at `indices` (as in `hidden_pairs`) during the forward
    passes inside the block, into the dict it yields, by forward hooks on the embedding and the
    decoder layers. (transformers' `output_hidden_states` is not used: it looks its recording
    rules up by the model's class, which FSDP replaces.)"""
    got = {}

    def keep(i):
        def hook(module, args, out):
            got[i] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [(model.model.embed_tokens if i == 0 else model.model.layers[i - 1])
               .register_forward_hook(keep(i)) for i in indices]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def make_proj(h_s: int, h_t: int, kept_hidden: list[int] | None) -> torch.nn.Module:
    """Identity when widths match; else a trainable Linear(h_s -> h_t), initialised to put each
    kept channel back where it came from when prune.py recorded the kept hidden channels."""
    if h_s == h_t:
        return torch.nn.Identity()
    proj = torch.nn.Linear(h_s, h_t, bias=False)
    if kept_hidden is not None and len(kept_hidden) == h_s and max(kept_hidden) < h_t:
        with torch.no_grad():
            proj.weight.zero_()
            proj.weight[torch.tensor(kept_hidden), torch.arange(h_s)] = 1.0
    return proj


def forward_flops_per_token(config, seq_len: int, lm_head: bool = True) -> int:
    """Matmul FLOPs of one token's forward pass at context `seq_len`: 2 per weight of the decoder
    and (when `lm_head`) the output layer; the embedding lookup is free; plus 4 x layers x heads
    x head_dim x seq_len for attention scores and values over the full square (the PaLM MFU
    convention, Chowdhery et al. 2022, appendix B). Training costs 3x this (backward: 2x)."""
    shape = common.shape_of(config)
    n = common.param_count(shape, config)["non_embedding"]
    n += config.vocab_size * shape["hidden_size"] if lm_head else 0
    attn = 4 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"] * seq_len
    return 2 * n + attn


def peak_tflops(device: str, override: float | None) -> float | None:
    """`override` (_PEAK_TFLOPS), else the datasheet peak of a known GPU, else None (no MFU)."""
    if override:
        return float(override)
    # dense bf16 tensor-core peaks (NVIDIA datasheets: A100 312 TFLOP/s, H100/H200 SXM 989);
    # the PCIe and NVL boards of H100/H200 are slower and left to _PEAK_TFLOPS
    known = {"A100": 312.0, "H100": 989.0, "H200": 989.0}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        if "A100" not in name and ("PCIe" in name or "NVL" in name):
            return None
        return next((v for k, v in known.items() if k in name), None)
    return None


def state_gib(s_conf, t_conf, teacher_dtype: torch.dtype, shards: int) -> dict:
    """Weights, gradients and optimizer state one process holds, in GiB (activations not
    included): the student trains in float32 with AdamW, 16 bytes per parameter (weight,
    gradient, two moments); the teacher only has weights. Under FSDP (`shards` processes) each
    holds 1/shards of both, plus the teacher's lm_head whole. `t_conf` None: no teacher (a
    teacher cache stands in for it)."""
    def params(c):
        return common.param_count(common.shape_of(c), c)["total"]
    student = 16 * params(s_conf) / shards
    if t_conf is None:
        return {"student": student / 2**30, "teacher": 0.0}
    t_bytes = torch.finfo(teacher_dtype).bits // 8
    head = t_conf.vocab_size * t_conf.hidden_size * t_bytes
    teacher = t_bytes * params(t_conf) / shards + (head * (1 - 1 / shards))
    return {"student": student / 2**30, "teacher": teacher / 2**30}


def peak_memory_gib(device: str) -> tuple[float, str]:
    """Peak memory of this process: CUDA memory allocated by tensors, else the peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, "cuda allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"


# ---- inputs ---------------------------------------------------------------------------------

def tokenizer_mismatch(a, b) -> str | None:
    """Why two tokenizers would give different token ids, or None when they agree."""
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} vs {len(b)} tokens)"
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        return f"vocabularies differ (e.g. {diff})"
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} differs ({getattr(a, name)!r} vs {getattr(b, name)!r})"
    if sorted(a.all_special_tokens) != sorted(b.all_special_tokens):
        return f"special tokens differ ({sorted(a.all_special_tokens)} vs {sorted(b.all_special_tokens)})"
    return None


def check_knobs(cfg):
    """Cheap checks on the knobs and recipe constants alone."""
    common.at_least(cfg, 1, "BATCH_SIZE", "GLOBAL_BATCH")
    common.at_least(cfg, 0, "EVAL_SAMPLES")
    common.at_least(cfg, 2, "SEQ_LEN")  # one next-token prediction per row at least
    if cfg.LR < 0 or _MIN_LR > cfg.LR:
        raise common.UserError(f"LR={cfg.LR} must be positive and at least _MIN_LR={_MIN_LR}")
    if cfg.MAX_STEPS is not None and cfg.MAX_STEPS < 1:
        raise common.UserError(f"MAX_STEPS must be a positive integer or None, got {cfg.MAX_STEPS}")
    if _KL_WEIGHT == 0 and _CE_WEIGHT == 0:
        raise common.UserError("_KL_WEIGHT and _CE_WEIGHT are both 0 in distill.py: nothing to train")
    if _TEMPERATURE <= 0 or _CHUNK_TOKENS < 1 or _KEEP_CHECKPOINTS < 1:
        raise common.UserError("distill.py's _TEMPERATURE, _CHUNK_TOKENS and _KEEP_CHECKPOINTS "
                               "must be positive")
    if _STOP_AT_STEP is not None and _STOP_AT_STEP < 1:
        raise common.UserError(f"_STOP_AT_STEP={_STOP_AT_STEP} must be a positive step or None")
    if not 0 <= cfg.ON_POLICY <= 1:
        raise common.UserError(f"ON_POLICY={cfg.ON_POLICY} is the share of on-policy steps: "
                               f"between 0 and 1")
    if cfg.DIVERGENCE not in DIVERGENCES:
        raise common.UserError(f"DIVERGENCE={cfg.DIVERGENCE!r} must be one of {list(DIVERGENCES)}")
    if not 0 < _JSD_BETA < 1:
        raise common.UserError(f"distill.py's _JSD_BETA={_JSD_BETA} must lie in (0, 1)")
    if cfg.ON_POLICY > 0 and cfg.FSDP:
        raise common.UserError("ON_POLICY > 0 samples with the whole student on every process: "
                               "run it with FSDP=False (DDP); FSDP-sharded generation is not supported")
    if cfg.ON_POLICY > 0 and cfg.TEACHER_CACHE:
        raise common.UserError("ON_POLICY > 0 needs the live teacher to score the student's "
                               "samples, which no cache holds: set TEACHER_CACHE=None")
    if cfg.ON_POLICY > 0 and _KL_WEIGHT == 0:
        raise common.UserError("ON_POLICY > 0 with _KL_WEIGHT=0 in distill.py: the student's own "
                               "samples carry no loss without the teacher's")
    if cfg.ON_POLICY > 0 and (_GEN_TEMPERATURE <= 0 or not 0 < _PROMPT_SHARE < 1):
        raise common.UserError(f"distill.py's _GEN_TEMPERATURE={_GEN_TEMPERATURE} must be positive "
                               f"and _PROMPT_SHARE={_PROMPT_SHARE} lie in (0, 1)")
    if cfg.TEACHER_CACHE is not None:
        common.at_least(cfg, 1, "TOPK")
        if cfg.DIVERGENCE != "forward_kl":
            raise common.UserError(f"a TEACHER_CACHE gives the forward KL only (its top k are the "
                                   f"teacher's, not the student's): DIVERGENCE={cfg.DIVERGENCE!r} "
                                   f"needs the live teacher (TEACHER_CACHE=None)")
        if _TEMPERATURE != 1:
            raise common.UserError(f"a TEACHER_CACHE holds temperature-1 log-probabilities; "
                                   f"_TEMPERATURE={_TEMPERATURE} in distill.py needs the live "
                                   f"teacher (TEACHER_CACHE=None)")
        if _CACHE_DTYPE not in CACHE_DTYPES or _CACHE_SHARD_ROWS < 1:
            raise common.UserError(f"distill.py's _CACHE_DTYPE={_CACHE_DTYPE!r} must be one of "
                                   f"{list(CACHE_DTYPES)} and _CACHE_SHARD_ROWS positive")


def resolve_models(cfg) -> dict:
    """Student record, teacher, configs, tokenizer and fingerprints, checked to belong together.
    With a TEACHER_CACHE that exists, its manifest names the teacher, whose files are not read
    (a cache that holds the rows needed works without them); "t_conf" is then None."""
    if not Path(cfg.STUDENT).is_dir():
        raise common.UserError(f"STUDENT={cfg.STUDENT!r} is not a directory; run prune.py first "
                               f"or set STUDENT to the pruned model's directory")
    s_conf = common.load_config(cfg.STUDENT, "STUDENT")
    common.family_of(s_conf, "STUDENT")
    # a student from elsewhere may have no record (then TEACHER names the teacher); prune.py's
    # record must hold what distill reads: the teacher, and the kept layers and channels
    record = common.read_record(cfg.STUDENT, ("stage", "source_model", "source_shape", "kept")) or {}
    tokenizer = common.load_tokenizer(cfg.STUDENT, "STUDENT")
    ids = {"student_id": common.fingerprint(cfg.STUDENT, "STUDENT")}
    manifest = read_manifest(Path(cfg.TEACHER_CACHE).expanduser()) if cfg.TEACHER_CACHE else None
    if manifest is not None:
        return {**teacher_of_cache(cfg, manifest, s_conf, tokenizer), **ids, "record": record,
                "s_conf": s_conf, "tokenizer": tokenizer}
    teacher, constant = cfg.TEACHER, "TEACHER"
    if teacher is None:
        if "source_model" not in record:
            raise common.UserError(f"STUDENT={cfg.STUDENT!r} has no {common.RECORD} naming its "
                                   f"source model; set TEACHER")
        teacher = record["source_model"]
        constant = f"source_model in {Path(cfg.STUDENT) / common.RECORD}"
    try:
        t_conf = common.load_config(teacher, constant)
    except common.UserError as e:
        raise common.UserError(f"cannot load the teacher: {e}") from None
    common.family_of(t_conf, constant)
    why = tokenizer_mismatch(tokenizer, common.load_tokenizer(teacher, constant))
    if why is None and s_conf.vocab_size != t_conf.vocab_size:
        why = f"vocab_size differs ({s_conf.vocab_size} vs {t_conf.vocab_size})"
    if why:
        raise common.UserError(f"student {cfg.STUDENT!r} and teacher {teacher!r} do not share a "
                               f"tokenizer: {why}; the KL needs the same token ids")
    if cfg.TEACHER_CACHE and cfg.TOPK > t_conf.vocab_size:
        raise common.UserError(f"TOPK={cfg.TOPK} exceeds the vocabulary ({t_conf.vocab_size} "
                               f"tokens); at most that (which caches every logit)")
    return {**ids, "record": record, "teacher": teacher, "s_conf": s_conf, "t_conf": t_conf,
            "t_layers": t_conf.num_hidden_layers, "tokenizer": tokenizer,
            "teacher_id": common.fingerprint(teacher, constant)}


def teacher_of_cache(cfg, manifest: dict, s_conf, tokenizer) -> dict:
    """The teacher of an existing cache, checked against TEACHER and the student's tokenizer."""
    check_manifest(manifest, cfg)
    name, where = manifest["teacher"], f"TEACHER_CACHE={cfg.TEACHER_CACHE!r}"
    if cfg.TEACHER is not None and cfg.TEACHER != name and (
            common.model_files(cfg.TEACHER) is None
            or common.fingerprint(cfg.TEACHER, "TEACHER") != manifest["teacher_fingerprint"]):
        raise common.UserError(f"{where} holds the log-probabilities of {name!r}, not of "
                               f"TEACHER={cfg.TEACHER!r}; leave TEACHER unset, or give a new "
                               f"TEACHER_CACHE for another teacher")
    if tokenizer_hash(tokenizer) != manifest["tokenizer"] or s_conf.vocab_size != manifest["vocab_size"]:
        raise common.UserError(f"STUDENT={cfg.STUDENT!r} does not share the tokenizer of the "
                               f"teacher {name!r} in {where}; the KL needs the same token ids")
    return {"teacher": name, "teacher_id": manifest["teacher_fingerprint"], "t_conf": None,
            "t_layers": manifest["teacher_layers"]}


def start_position() -> dict:
    """Where `row_stream` begins: epoch 0, no rows, documents or carried tokens yet."""
    return {"epoch": 0, "row": 0, "documents": 0, "carry": []}


def row_stream(dataset: str, tokenizer, seq_len: int, seed: int, held_out: int, position: dict):
    """Training rows forever: DATASET's packed rows after the first `held_out`, in the same order
    again when the data runs out. Begins at `position` and keeps it up to date in place (epoch,
    rows of this epoch, and packed_rows' documents read and carried tokens), so a copy saved
    after any row resumes right after it without re-reading the data before it."""
    while True:
        for row in common.packed_rows(dataset, tokenizer, seq_len, seed, position):
            position["row"] += 1
            if position["row"] > held_out:
                yield row
        if position["row"] <= held_out:
            raise common.UserError(f"DATASET={dataset!r} has no rows of SEQ_LEN={seq_len} tokens "
                                   f"left after the {held_out} held-out rows; use more data, "
                                   f"a smaller SEQ_LEN or fewer EVAL_SAMPLES")
        common.print0(f"data: DATASET has {position['row'] - held_out} training rows of "
                      f"{seq_len} tokens; repeating it (epoch {position['epoch'] + 2})")
        position.update(start_position(), epoch=position["epoch"] + 1)


def local_batch(stream, global_batch: int, rank: int, world: int, stack: bool = True):
    """This process's share of the next global batch (every process reads it all): rows as one
    tensor, or (`stack` False) a list, e.g. of prompts of different lengths."""
    items = [next(stream) for _ in range(global_batch)]
    share = global_batch // world
    mine = items[rank * share:(rank + 1) * share]
    return torch.stack(mine) if stack else mine


def schedule(cfg, world: int) -> dict:
    """Derived sizes: micro-batches per step, tokens per step, steps, warmup, where to stop."""
    if cfg.GLOBAL_BATCH % (cfg.BATCH_SIZE * world):
        raise common.UserError(f"GLOBAL_BATCH={cfg.GLOBAL_BATCH} is not a multiple of BATCH_SIZE="
                               f"{cfg.BATCH_SIZE} x {world} processes")
    tokens = cfg.GLOBAL_BATCH * cfg.SEQ_LEN
    steps = cfg.MAX_STEPS or max(1, _TOTAL_TOKENS // tokens)
    return {"accum": cfg.GLOBAL_BATCH // (cfg.BATCH_SIZE * world), "tokens_per_step": tokens,
            "max_steps": steps, "stop": min(steps, _STOP_AT_STEP or steps),
            "warmup": min(_WARMUP_STEPS, steps // 10)}  # warmup past a tenth of a run wastes it


# ---- checkpoints: plain tensors (torch.load weights_only=True) and JSON, no pickled code ----

def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "progress.json").is_file())


def is_checkpoint_root(path: Path) -> bool:
    return common.is_record_of(path, "distill-checkpoints")


def read_progress(path: Path) -> dict:
    """progress.json of checkpoint `path` (the one reader of write_progress's file)."""
    try:
        progress = json.loads((path / "progress.json").read_text())
    except ValueError as e:
        raise common.UserError(f"{path / 'progress.json'} is not JSON ({e}); delete {path}") from None
    if progress.get("format") != 2:  # 2: tensors and JSON only (1 was accelerate's pickles)
        raise common.UserError(f"{path} was written by an older version of distill.py; delete "
                               f"{path.parent} to start again")
    missing = [k for k in PROGRESS_KEYS if k not in progress]
    if missing:
        raise common.UserError(f"{path / 'progress.json'} lacks {missing}; delete {path.parent}")
    return progress


def write_progress(path: Path, **fields):
    """progress.json: where training stands and what it belongs to (see PROGRESS_KEYS)."""
    assert set(fields) == set(PROGRESS_KEYS) - {"format"} | {"prompts"}, sorted(fields)  # prompts:
    # where on-policy prompts stand (optional: checkpoints before on-policy steps lack it)
    (path / "progress.json").write_text(json.dumps({"format": 2, **fields}, indent=2, default=str))


def check_resumable(progress: dict, path: Path, settings: dict, ids: dict, shard: bool,
                    world: int):
    """Refuse to resume from checkpoint `path` when the losses would not continue: other
    settings, another student or teacher (by content), the other checkpoint format."""
    saved = progress["settings"]
    changed = {k: (saved.get(k), v) for k, v in settings.items()
               if k not in RESUMABLE and saved.get(k) != v}
    if changed:
        raise common.UserError(f"{path} was written with other settings {changed} "
                               f"(saved, now); restore them or delete {path.parent}")
    for who in ("student", "teacher"):
        if not common.same_model(progress[who], ids[f"{who}_name"], ids[who], who.upper()):
            raise common.UserError(f"{path} belongs to another {who} (fingerprint "
                                   f"{progress[who]}, now {ids[who]}: the {who} was replaced "
                                   f"since); delete {path.parent} to start again")
    if bool(progress["fsdp"]) != shard:
        raise common.UserError(f"{path} was written with FSDP={progress['fsdp']} (sharded "
                               f"checkpoint or not); resume with the same FSDP, or delete "
                               f"{path.parent}")
    if progress["world"] != world:
        common.print0(f"warning: checkpoint written by {progress['world']} processes, resuming on "
                      f"{world}: same data order, losses equal only within float tolerance")


def latest_progress(cfg, m: dict, root: Path, shard: bool, world: int) -> tuple:
    """(checkpoints under `root`, the latest one's progress or None), checked to resume."""
    saved = checkpoints(root)
    progress = read_progress(saved[-1]) if saved else None
    if progress:
        check_resumable(progress, saved[-1], {**vars(cfg), **common.recipe(globals())},
                        model_ids(cfg, m), shard, world)
    return saved, progress


def model_ids(cfg, m: dict) -> dict:
    """The fingerprints a checkpoint is checked against, and the models they are of."""
    return {"student": m["student_id"], "teacher": m["teacher_id"], "student_name": cfg.STUDENT,
            "teacher_name": m["teacher"]}


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(path: Path, model, optimizer, rank: int):
    """Weights and optimizer state of an unsharded run (the first process) and every process's
    RNG, as plain tensor files."""
    if rank == 0:
        torch.save(model.state_dict(), path / "model.pt")
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(rng_state(), path / f"rng-{rank}.pt")


def load_tensors(path: Path, device: str = "cpu"):
    """A checkpoint file of tensors and plain containers (torch's weights_only loader, which
    refuses anything that would run code), or a UserError naming the file."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise common.UserError(f"{path} is not a checkpoint file of tensors "
                               f"({' '.join(str(e).split())[:150]}); delete {path.parent.parent} "
                               f"to start again") from None


def load_rng(path: Path, rank: int):
    rng = path / f"rng-{rank}.pt"  # another number of processes: the first one's
    set_rng_state(load_tensors(rng if rng.exists() else path / "rng-0.pt"))


def load_state(path: Path, model, optimizer, rank: int, device: str):
    """Inverse of save_state; nothing is unpickled beyond tensors and plain containers."""
    model.load_state_dict(load_tensors(path / "model.pt", device))
    optimizer.load_state_dict(load_tensors(path / "optimizer.pt", device))
    load_rng(path, rank)


class SafeUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's `.metadata` (which DCP reads with plain pickle)
    allowing only its own metadata classes, torch sizes and dtypes: nothing that runs code."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "Path")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def safe_reader(path: Path):
    """A DCP FileSystemReader whose metadata goes through SafeUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            try:
                with open(path / ".metadata", "rb") as f:
                    metadata = SafeUnpickler(f).load()
            except (pickle.UnpicklingError, OSError, EOFError) as e:
                raise common.UserError(f"{path}/.metadata is not a Pare checkpoint's ({e}); "
                                       f"delete {path.parent}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))


def save_sharded(path: Path, model, optimizer, rank: int):
    """Model and optimizer tensors as a torch.distributed.checkpoint (each process writes its
    shards; another number of processes can load it), the optimizer's hyperparameters as JSON
    and every process's RNG. Only tensors go to DCP: it would pickle anything else."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd["state"]}, checkpoint_id=str(path))
    if rank == 0:
        (path / "param_groups.json").write_text(json.dumps(osd["param_groups"]))
    torch.save(rng_state(), path / f"rng-{rank}.pt")


def load_sharded(path: Path, model, optimizer, rank: int):
    """Inverse of save_sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, optimizer)  # initialises the optimizer state to load into
    state = {"model": msd, "optim": osd["state"]}
    dcp.load(state, storage_reader=safe_reader(path))
    groups = json.loads((path / "param_groups.json").read_text())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": groups})
    load_rng(path, rank)


def save_checkpoint(root: Path, step: int, model, optimizer, acc, shard: bool, progress: dict
                    ) -> Path:
    """Checkpoint `step` under `root`, written to a temporary directory and renamed when
    complete (a killed run leaves only a temporary that the next run removes); the oldest beyond
    _KEEP_CHECKPOINTS are deleted. Every process must call it."""
    tmp, final = root / f".step-{step:07d}.tmp", root / f"step-{step:07d}"
    rank = acc.process_index
    if rank == 0:
        mark_checkpoint_root(root, progress["settings"]["OUTPUT"])
        common.remove(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        with common.writing(tmp):
            if shard:
                save_sharded(tmp, model, optimizer, rank)
            else:
                save_state(tmp, acc.unwrap_model(model), optimizer, rank)
            acc.wait_for_everyone()
            if rank == 0:
                write_progress(tmp, **progress)
                common.remove(final)
                tmp.rename(final)
                for old in checkpoints(root)[:-_KEEP_CHECKPOINTS]:
                    common.remove(old)
    finally:
        if rank == 0:
            common.remove(tmp)  # a failed write leaves no half checkpoint (gone once renamed)
    acc.wait_for_everyone()
    return final


def mark_checkpoint_root(root: Path, output: str):
    """Create `root` with a record saying it is distill.py's checkpoint directory (so that a
    later run may write into it) and drop the temporaries of killed runs."""
    if not is_checkpoint_root(root):
        with common.writing(root):
            root.mkdir(parents=True, exist_ok=True)
            (root / common.RECORD).write_text(json.dumps(
                {"stage": "distill-checkpoints", "output": output, "created": common.now()}) + "\n")
    for tmp in root.glob(".step-*.tmp"):
        common.remove(tmp)


# ---- sharding (FSDP2) -----------------------------------------------------------------------
def empty_model(config, dtype: torch.dtype):
    """The architecture of `config` without weights (meta device), for a process that will
    receive its shards from the first process instead of reading the checkpoint itself."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def shard_models(model: Distiller, teacher, device: str, world: int, bf16: bool) -> None:
    """Shard the Distiller (student + map) and the teacher's decoder over all processes in place.

    Each decoder layer is one FSDP2 group, gathered just before it runs and freed after; the rest
    (embeddings, final norm, lm_head, map) is the root group, gathered for the whole forward. The
    teacher's lm_head stays whole on every process. Parameters on the CPU move to `device` as
    they are sharded, one layer at a time; parameters on the meta device stay there.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    mesh = init_device_mesh(torch.device(device).type, (world,))  # DEVICE=cpu on a GPU machine too
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for layer in model.student.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "held_out")  # gathers the root group like forward
    if teacher is None:  # read from a cache
        return
    for layer in teacher.model.layers:
        fully_shard(layer, mesh=mesh)
    # the teacher never runs backward, which is where a root group is normally freed again
    fully_shard(teacher.model, mesh=mesh, reshard_after_forward=True)


def broadcast_weights(module, full_state: dict, device: str, rank: int) -> None:
    """Fill a sharded `module` from the first process's `full_state` (its state dict taken before
    sharding; {} on the other processes, whose weights are on the meta device): each process
    keeps its shards. Buffers (e.g. rotary frequencies, not in the state dict) are copied too."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if rank > 0:
        module.to_empty(device=device)
    set_model_state_dict(module, full_state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def local_share(module) -> tuple[int, int]:
    """(elements this process holds, elements in all) of a module's parameters."""
    from torch.distributed.tensor import DTensor
    mine = total = 0
    for p in module.parameters():
        total += p.numel()
        mine += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return mine, total


def full_student(model, student_dir: str):
    """The sharded student gathered into an ordinary model on the first process (None on the
    others); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    if not sd:
        return None
    student = common.load_model(student_dir, "cpu", torch.float32, "STUDENT")
    student.load_state_dict({k.removeprefix("student."): v for k, v in sd.items()
                             if k.startswith("student.")})
    return student


# ---- on-policy steps: the student's own samples, scored by the teacher -----------------------

def on_policy_step(step: int, share: float) -> bool:
    """Whether optimizer step `step` (1-based) trains on the student's samples: a draw < `share`
    from a generator seeded by (_SEED, step), so that a resumed run and every process agree."""
    if share <= 0:
        return False
    return share >= 1 or torch.rand(1, generator=torch.Generator().manual_seed(
        _SEED * 1_000_003 + step)).item() < share


def prompt_start(held_documents: int) -> dict:
    """Where prompt_stream begins: after the documents the held-out rows were packed from."""
    return {"epoch": 0, "documents": held_documents, "after_held_out": held_documents}


def prompt_ids(doc, tokenizer, seq_len: int, n: int) -> list[int] | None:
    """The prompt of document number `n`: a `messages` conversation up to its last user turn,
    rendered with the chat template and its generation prompt; else the first _PROMPT_SHARE x
    `seq_len` tokens of its text (None: an empty text)."""
    if isinstance(doc, dict) and "messages" in doc:
        common.render(doc, tokenizer)  # the template and the record's shape, checked
        turns = doc["messages"]
        users = [i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "user"]
        if not users:
            raise common.UserError(f"DATASET document {n} has no user turn: ON_POLICY prompts the "
                                   f"student with a conversation up to its last user turn; drop "
                                   f"such records, or set ON_POLICY=0")
        text = tokenizer.apply_chat_template(turns[:users[-1] + 1], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > seq_len - 2:
            raise common.UserError(f"DATASET document {n}'s prompt is {len(ids)} tokens: SEQ_LEN="
                                   f"{seq_len} leaves no room to sample an answer; raise SEQ_LEN "
                                   f"or drop long conversations")
        return ids
    ids = tokenizer(common.render(doc, tokenizer), add_special_tokens=False)["input_ids"]
    return ids[:max(1, int(seq_len * _PROMPT_SHARE))] or None


def prompt_stream(dataset: str, tokenizer, seq_len: int, seed: int, position: dict,
                  strict: bool = True):
    """Prompts forever, one per document of DATASET after the held-out ones (in the order
    row_stream reads them; again from the first when they run out), keeping `position` up to
    date in place like row_stream. A document that cannot give a prompt is an error when
    `strict` (the first step's, checked before anything loads), else skipped with a warning
    (so that one odd record in a large dataset cannot stop a long run for good)."""
    while True:
        found = False
        for doc in common.documents(dataset, seed, skip=position["documents"]):
            n = position["documents"]
            position["documents"] += 1
            try:
                ids = prompt_ids(doc, tokenizer, seq_len, n)
            except common.UserError as e:
                if strict:
                    raise
                common.print0(f"warning: skipped: {e}")
                continue
            if ids:
                found = True
                yield torch.tensor(ids, dtype=torch.long)
        if not found:
            raise common.UserError(f"DATASET={dataset!r} has no documents to prompt with after "
                                   f"the held-out rows; use more data or fewer EVAL_SAMPLES")
        position.update(epoch=position["epoch"] + 1, documents=position["after_held_out"])


def next_batch(cfg, data: dict, step: int, rank: int, world: int) -> tuple:
    """This process's share of step `step`'s batch: ("sample", prompts) on an on-policy step,
    else ("rows", packed rows)."""
    if on_policy_step(step, cfg.ON_POLICY):
        return "sample", local_batch(data["prompts"], cfg.GLOBAL_BATCH, rank, world, stack=False)
    return "rows", local_batch(data["stream"], cfg.GLOBAL_BATCH, rank, world)


def check_generation(cfg, s_conf, tokenizer):
    """Refuse a student that could not sample, before anything loads."""
    limit = getattr(s_conf, "max_position_embeddings", None)
    if limit is not None and cfg.SEQ_LEN > limit:
        raise common.UserError(f"STUDENT's config allows {limit} positions (max_position_embeddings) "
                               f"and SEQ_LEN={cfg.SEQ_LEN}: sampling would run past them; lower SEQ_LEN")
    if end_tokens(s_conf, tokenizer) == []:
        raise common.UserError("STUDENT has no eos token (config or tokenizer): a sample could "
                               "never end; set eos_token_id in its config.json")


def end_tokens(config, tokenizer) -> list[int]:
    ids = getattr(config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def sample_rows(student, prompts: list, seq_len: int, eos: list[int], pad: int, acc) -> tuple:
    """The student's continuations of `prompts` (1-D token tensors) as rows of `seq_len` tokens:
    (rows, mask, sampled tokens). Each row is its prompt, the sampled tokens up to and with the
    first eos, then padding; `mask` [rows, seq_len - 1] marks the predictions of the sampled
    tokens. Sampling is transformers' `generate` (batched, left-padded, KV cache, from the full
    distribution at _GEN_TEMPERATURE with the global torch RNG, which checkpoints save): this is
    the one function a faster engine (e.g. vLLM) would replace."""
    from transformers import GenerationConfig
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(batch)
    for b, p in enumerate(prompts):
        batch[b, width - len(p):], attention[b, width - len(p):] = p, 1
    sampling = GenerationConfig(do_sample=True, temperature=_GEN_TEMPERATURE, top_k=0, top_p=1.0,
                                max_new_tokens=seq_len - width, pad_token_id=pad, eos_token_id=eos)
    # the student's own generation_config (repetition penalty, top-k, ...) would bend the
    # distribution the loss is on: a neutral one for the call
    saved, student.generation_config = student.generation_config, GenerationConfig(
        pad_token_id=pad, eos_token_id=eos)
    was_training = student.training
    student.eval()
    dev = common.input_device(student)
    try:
        with torch.no_grad(), acc.autocast():
            out = student.generate(input_ids=batch.to(dev), attention_mask=attention.to(dev),
                                   generation_config=sampling)
    finally:
        student.generation_config = saved
        student.train(was_training)
    rows = torch.full((len(prompts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), seq_len - 1, dtype=torch.bool)
    sampled = 0
    ends = torch.tensor(eos)
    for b, p in enumerate(prompts):
        new = out[b, width:].cpu()
        hit = torch.isin(new, ends).nonzero()
        new = new[:hit[0, 0] + 1] if len(hit) else new
        rows[b, :len(p)], rows[b, len(p):len(p) + len(new)] = p, new
        mask[b, len(p) - 1:len(p) - 1 + len(new)] = True
        sampled += len(new)
    return rows, mask, sampled


# ---- the teacher cache: the teacher's top-k log-probabilities, computed once -----------------
# TEACHER_CACHE holds pare.json (the manifest: `new_manifest` builds it, `read_manifest` reads
# it), eval.safetensors (the held-out rows) and train-NNNNNN.safetensors (the training rows in
# row_stream's order, `shard_rows` a file). Per row and predicted token: `ids` (int32) and
# `logp`, the teacher's k most likely next tokens, sorted by id, and their log-probabilities
# (temperature 1); `rest`, the log of the teacher's probability outside them; `target`, its
# log-probability of the actual next token (for its perplexity); per row `row_hash`, which the
# reader compares with the rows the run reads, so other text can never meet these targets.

CACHE_KEYS = ("stage", "format", "teacher", "teacher_fingerprint", "teacher_layers", "tokenizer",
              "vocab_size", "data", "topk", "dtype", "shard_rows", "rows", "versions", "created")
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def tokenizer_hash(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary and the special tokens."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([getattr(tokenizer, n) for n in ("bos_token", "eos_token", "pad_token",
                                                         "unk_token")]
                        + sorted(tokenizer.all_special_tokens)).encode())
    return "sha256:" + h.hexdigest()[:32]


def row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of each row's token ids."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(r.numpy().astype("<i8").tobytes(),
                                                        digest_size=8).digest(), "little", signed=True)
                         for r in rows.cpu()], dtype=torch.int64)


def cache_data(cfg) -> dict:
    """The settings that decide which rows a cache holds, in which order."""
    return {"DATASET": cfg.DATASET, "SEQ_LEN": cfg.SEQ_LEN, "EVAL_SAMPLES": cfg.EVAL_SAMPLES,
            "_EVAL_DATASET": _EVAL_DATASET, "_SEED": _SEED}


def new_manifest(cfg, m: dict) -> dict:
    """The manifest of a new cache of `m`'s teacher (resolve_models' result) for this run's data."""
    return {"stage": "teacher-cache", "format": 1, "teacher": m["teacher"],
            "teacher_fingerprint": m["teacher_id"], "teacher_layers": m["t_layers"],
            "tokenizer": tokenizer_hash(m["tokenizer"]), "vocab_size": m["t_conf"].vocab_size,
            "data": cache_data(cfg), "topk": cfg.TOPK, "dtype": _CACHE_DTYPE,
            "shard_rows": _CACHE_SHARD_ROWS, "rows": 0, "versions": common.versions(),
            "created": common.now()}


def read_manifest(path: Path) -> dict | None:
    """The manifest of the cache at `path`, None when there is none yet."""
    f = path / common.RECORD
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except ValueError as e:
        raise common.UserError(f"{f} is not JSON ({e}); delete {path} to start the cache again") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != "teacher-cache":
        raise common.UserError(f"TEACHER_CACHE={str(path)!r} is not a teacher cache (see its "
                               f"{common.RECORD}); give a new directory")
    missing = [k for k in CACHE_KEYS if k not in manifest]
    if missing or manifest["format"] != 1 or manifest["dtype"] not in CACHE_DTYPES:
        raise common.UserError(f"{f} is not a teacher cache manifest of this version (lacks "
                               f"{missing}); delete {path} to start the cache again")
    return manifest


def check_manifest(manifest: dict, cfg):
    """Refuse a cache written for other rows or another k before any work."""
    now = {**cache_data(cfg), "TOPK": cfg.TOPK}
    saved = {**manifest["data"], "TOPK": manifest["topk"]}
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        raise common.UserError(f"TEACHER_CACHE={cfg.TEACHER_CACHE!r} was written for other "
                               f"settings {changed} (cache, now): its rows would not be this "
                               f"run's; restore them or give a new TEACHER_CACHE")


def write_manifest(path: Path, manifest: dict):
    if common.is_first_process():
        common.write_atomic(path / common.RECORD,
                            lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))


def shard_path(path: Path, index: int) -> Path:
    return path / f"train-{index:06d}.safetensors"


def teacher_topk(teacher, rows: torch.Tensor, k: int, batch_size: int, chunk: int,
                 dtype: torch.dtype, acc) -> dict:
    """The cache's tensors for `rows` [n, L]: the teacher runs `batch_size` rows at a time and
    its logits exist `chunk` tokens at a time, as in training (so that with k = vocab and
    float32 the targets are exactly the live ones)."""
    parts = {"ids": [], "logp": [], "rest": [], "target": []}
    for ids in common.batches(rows.to(acc.device), batch_size):
        with torch.no_grad(), acc.autocast():
            h = teacher.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
            w = teacher.lm_head.weight.to(h.dtype)
            wide = torch.promote_types(h.dtype, torch.float32)
            y = ids[:, 1:].flatten()
            for i in range(0, len(h), chunk):
                lt = (h[i:i + chunk] @ w.T).to(wide).log_softmax(-1)
                idx, top, rest = topk_entries(lt, k)
                parts["ids"].append(idx.int().cpu())
                parts["logp"].append(top.to(dtype).cpu())
                parts["rest"].append(rest.to(dtype).cpu())
                parts["target"].append(lt.gather(1, y[i:i + chunk, None])[:, 0].to(dtype).cpu())
    shape = (len(rows), rows.shape[1] - 1)
    out = {name: torch.cat(p).view(*shape, -1) for name, p in parts.items()}
    out["rest"], out["target"] = out["rest"][..., 0], out["target"][..., 0]
    return {**out, "row_hash": row_hashes(rows)}


def topk_entries(lt: torch.Tensor, k: int) -> tuple:
    """(ids, log-probabilities, log of the rest) of log-probabilities `lt` [n, vocab]: the k
    largest, sorted by token id (so that k = vocab keeps the vocabulary's order), and the log of
    the mass outside them (-inf when k = vocab)."""
    top, idx = lt.topk(k, dim=-1)
    idx, order = idx.sort(dim=-1)
    return idx, top.gather(1, order), lt.scatter(1, idx, -math.inf).logsumexp(-1)


def write_shard(path: Path, tensors: dict):
    from safetensors.torch import save_file
    common.write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                    str(tmp)))


def fill_cache(path: Path, manifest: dict, teacher, tokenizer, cfg, env: dict, n_shards: int):
    """Write the shards below `n_shards` (and the held-out rows' file) that `path` lacks: each
    process its own share (shard i: process i mod world), reading the same row stream as
    training. A shard appears whole or not at all, so a killed fill resumes where it stopped."""
    acc, rank, world = env["acc"], env["rank"], env["world"]
    rows_per, k, dtype = manifest["shard_rows"], manifest["topk"], CACHE_DTYPES[manifest["dtype"]]
    todo = [s for s in range(n_shards) if s % world == rank and not shard_path(path, s).is_file()]
    mine_eval = rank == 0 and len(env["eval_rows"]) and not (path / "eval.safetensors").is_file()
    n_tokens = (len(todo) * rows_per + (len(env["eval_rows"]) if mine_eval else 0)) * (cfg.SEQ_LEN - 1)
    bar = tqdm(total=n_tokens, desc="teacher cache", unit="tok", unit_scale=True,
               disable=not common.is_first_process())
    t0, written = time.time(), 0
    args = (k, cfg.BATCH_SIZE, _CHUNK_TOKENS, dtype, acc)
    if mine_eval:
        write_shard(path / "eval.safetensors", teacher_topk(teacher, env["eval_rows"], *args))
        written += (path / "eval.safetensors").stat().st_size
        bar.update(len(env["eval_rows"]) * (cfg.SEQ_LEN - 1))
    stream = row_stream(cfg.DATASET, tokenizer, cfg.SEQ_LEN, _SEED, env["held"], start_position())
    for s in range(max(todo) + 1 if todo else 0):
        rows = torch.stack([next(stream) for _ in range(rows_per)])  # every process reads all
        if s in todo:
            write_shard(shard_path(path, s), teacher_topk(teacher, rows, *args))
            written += shard_path(path, s).stat().st_size
            bar.update(rows_per * (cfg.SEQ_LEN - 1))
    bar.close()
    dt, tok = time.time() - t0, n_tokens
    if tok:
        common.print0(f"teacher cache: {len(todo)} shards, {tok:,} tokens in {dt:.1f}s "
                      f"({tok / dt:,.0f} tokens/s this process), {written / tok:.1f} bytes per token "
                      f"(k={k}, {manifest['dtype']}: {4 + dtype.itemsize} bytes a "
                      f"kept logit)")
    return {"tokens": tok, "seconds": dt, "bytes": written}


def prepare_cache(cfg, m: dict, env: dict, n_rows: int):
    """The TeacherCache of this run, holding its first `n_rows` training rows and its held-out
    rows: filled with the teacher first where it lacks them (the teacher loaded only then)."""
    path = Path(cfg.TEACHER_CACHE).expanduser()
    manifest, filled = read_manifest(path), None
    if manifest is None:
        manifest = new_manifest(cfg, m)
        with common.writing(path):
            if common.is_first_process():
                path.mkdir(parents=True, exist_ok=True)
        write_manifest(path, manifest)  # marks the directory as a cache before any shard
    env["acc"].wait_for_everyone()  # the manifest exists before any process writes a shard
    n_shards = math.ceil(n_rows / manifest["shard_rows"])
    have = sum(shard_path(path, s).is_file() for s in range(n_shards))
    lacks_eval = len(env["eval_rows"]) > 0 and not (path / "eval.safetensors").is_file()
    env["acc"].wait_for_everyone()  # every process decided on the same files before any write
    if have < n_shards or lacks_eval:
        common.print0(f"teacher cache: {path} holds {have} of the {n_shards} shards this run "
                      f"needs ({n_rows} rows){' and not the held-out rows' if lacks_eval else ''}; "
                      f"filling them with the teacher {manifest['teacher']}")
        check_cached_rows(path, manifest, m["tokenizer"], cfg, env, n_shards)
        check_disk(path, manifest, cfg, (n_shards - have) * manifest["shard_rows"]
                   + (len(env["eval_rows"]) if lacks_eval else 0))
        teacher = load_cache_teacher(manifest, str(env["acc"].device), env["dtype"])
        filled = fill_cache(path, manifest, teacher, m["tokenizer"], cfg, env, n_shards)
        del teacher
        env["acc"].wait_for_everyone()
        manifest["rows"] = max(manifest["rows"], n_shards * manifest["shard_rows"])
        write_manifest(path, manifest)
    common.print0(f"teacher cache: {path}, k={manifest['topk']} of {manifest['teacher']}'s "
                  f"log-probabilities, {manifest['rows']} rows; no teacher runs in training")
    return TeacherCache(path, manifest, filled)


def check_cached_rows(path: Path, manifest: dict, tokenizer, cfg, env: dict, n_shards: int):
    """Before the teacher runs: the files the cache already has hold this run's rows (a
    DATASET edited since would otherwise be found only when training reaches them)."""
    cache, per = TeacherCache(path, manifest), manifest["shard_rows"]
    if len(env["eval_rows"]) and (path / "eval.safetensors").is_file():
        cache.held_out(env["eval_rows"])
    have = [s for s in range(n_shards) if shard_path(path, s).is_file()]
    stream = row_stream(cfg.DATASET, tokenizer, cfg.SEQ_LEN, _SEED, env["held"], start_position())
    for s in range(max(have) + 1 if have else 0):
        rows = torch.stack([next(stream) for _ in range(per)])
        if s in have:
            cache.train_rows(s * per, rows)


def check_disk(path: Path, manifest: dict, cfg, rows: int):
    """Refuse a fill the disk cannot hold, before the teacher runs."""
    need = rows * (cfg.SEQ_LEN - 1) * (manifest["topk"] * (4 + CACHE_DTYPES[manifest["dtype"]].itemsize)
                                       + 2 * CACHE_DTYPES[manifest["dtype"]].itemsize) + rows * 8
    free = shutil.disk_usage(path).free
    if need > free:
        raise common.UserError(f"TEACHER_CACHE={str(path)!r} needs about {need / 1e9:.1f} GB more "
                               f"({rows:,} rows at k={manifest['topk']}) and its disk has "
                               f"{free / 1e9:.1f} GB free; free space, lower TOPK or MAX_STEPS")


def load_cache_teacher(manifest: dict, device: str, dtype: torch.dtype):
    """The teacher a cache was begun with, refused if it changed since (by content)."""
    name = manifest["teacher"]
    try:
        teacher = load_teacher(name, device, dtype)  # first: a hub model's files are then there
    except common.UserError as e:
        raise common.UserError(f"the teacher cache lacks rows this run needs, and its teacher "
                               f"cannot be read ({e})") from None
    now = common.fingerprint(name, "the teacher in TEACHER_CACHE's manifest")
    if not common.same_model(manifest["teacher_fingerprint"], name, now):
        raise common.UserError(f"the teacher {name!r} changed since its cache was begun "
                               f"(fingerprint {manifest['teacher_fingerprint']}, now {now}); "
                               f"give a new TEACHER_CACHE")
    return teacher


class TeacherCache:
    """Reads a cache's targets for given rows (training rows by their index in row_stream's
    order, or the held-out rows) and checks that the rows are the ones it was written for."""

    def __init__(self, path: Path, manifest: dict, filled: dict | None = None):
        self.path, self.manifest, self.files = path, manifest, {}
        self.filled = filled  # what this run wrote into it: tokens, seconds, bytes (this process)

    def _open(self, file: Path):
        from safetensors import safe_open
        if file not in self.files:
            if not file.is_file():
                raise common.UserError(f"{file} is missing from the teacher cache; run the same "
                                       f"command again to fill it (the teacher is needed)")
            self.files = {file: safe_open(str(file), framework="pt")}  # one open file at a time
        return self.files[file]

    def _check(self, got: torch.Tensor, rows: torch.Tensor, where: str):
        if not torch.equal(got, row_hashes(rows)):
            raise common.UserError(f"the teacher cache {self.path} holds other text at {where} "
                                   f"than this run reads (was DATASET changed since the cache was "
                                   f"written?); give a new TEACHER_CACHE")

    def train_rows(self, start: int, rows: torch.Tensor) -> dict:
        """Targets of training rows start .. start + len(rows) - 1 (`rows`: their token ids)."""
        per, parts = self.manifest["shard_rows"], []
        i, end = start, start + len(rows)
        while i < end:
            s, off = divmod(i, per)
            n = min(end - i, per - off)
            f = self._open(shard_path(self.path, s))
            parts.append({k: f.get_slice(k)[off:off + n] for k in f.keys()})
            i += n
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self._check(out.pop("row_hash"), rows, f"training rows {start}..{end - 1}")
        return out

    def held_out(self, rows: torch.Tensor) -> dict:
        f = self._open(self.path / "eval.safetensors")
        out = {k: f.get_tensor(k) for k in f.keys()}
        self._check(out.pop("row_hash"), rows, "the held-out rows")
        return out


@torch.no_grad()
def cached_evaluate(student, rows: torch.Tensor, batch_size: int, targets: dict,
                    chunk: int) -> dict:
    """common.evaluate's metrics with the teacher read from a cache: KL as `topk_kl` (k + 1
    buckets, a lower bound of the full KL), the teacher's perplexity from its cached
    log-probability of each next token."""
    nll_s = nll_t = kl = 0.0
    count = 0
    for b, ids in enumerate(common.batches(rows, batch_size)):
        hs = common.final_hidden(student, ids)[:, :-1].flatten(0, 1)
        t = {k: v[b * batch_size:b * batch_size + len(ids)].flatten(0, 1).to(hs.device)
             for k, v in targets.items()}
        labels = ids[:, 1:].flatten().to(hs.device)
        for i in range(0, len(labels), chunk):
            ls = student.lm_head(hs[i:i + chunk]).float().log_softmax(-1)
            nll_s -= ls.gather(1, labels[i:i + chunk, None]).sum().item()
            kl += topk_kl(ls, *(t[n][i:i + chunk] for n in ("ids", "logp", "rest")))[0].item()
        nll_t -= t["target"].double().sum().item()
        count += len(labels)
    return {"student_ppl": math.exp(nll_s / count), "teacher_ppl": math.exp(nll_t / count),
            "kl": kl / count, "tokens": count}



# ---- selection between candidates (several STUDENTs) ----------------------------------------

def select_root(cfg) -> str:
    return f"{cfg.OUTPUT.rstrip('/')}-select"


def candidates(cfg) -> list:
    """The knobs of one run per student: `cfg` itself for one STUDENT; for a list, a copy per
    directory with STUDENT set to it and OUTPUT to its own directory under OUTPUT-select."""
    if not isinstance(cfg.STUDENT, list):
        return [cfg]
    dirs = cfg.STUDENT
    if len(dirs) < 2 or not all(isinstance(d, str) and d for d in dirs):
        raise common.UserError(f"STUDENT={dirs!r}: give one directory, or a list of two or more "
                               f"to select between")
    if len({Path(d).resolve() for d in dirs}) < len(dirs):
        raise common.UserError(f"STUDENT={dirs!r} names a directory twice")
    return [types.SimpleNamespace(**{**vars(cfg), "STUDENT": d,
                                     "OUTPUT": str(Path(select_root(cfg)) / f"{i}-{Path(d).name}")})
            for i, d in enumerate(dirs)]


def check_candidates(runs: list, ms: list):
    """Candidates are compared on one teacher's KL: the same teacher, by content."""
    for run, m in zip(runs[1:], ms[1:]):
        if m["teacher_id"] != ms[0]["teacher_id"]:
            raise common.UserError(f"the candidates have different teachers ({runs[0].STUDENT!r}: "
                                   f"{ms[0]['teacher']!r}, {run.STUDENT!r}: {m['teacher']!r}); "
                                   f"select between students of one teacher, or set TEACHER")


def funnel(cfg, plan: dict, n: int, shard: bool) -> list[int]:
    """The step at which each selection round ends (the same for every candidate in it): the
    first round SELECT_TOKENS per candidate, each next _SELECT_GROWTH x longer, as many rounds
    as it takes _SELECT_KEEP to leave one candidate."""
    if shard:
        raise common.UserError("several STUDENTs are selected between without sharding: run the "
                               "selection with FSDP=False (DDP), then shard the winner's run")
    if not cfg.EVAL_SAMPLES:
        raise common.UserError("several STUDENTs are ranked by held-out KL: set EVAL_SAMPLES > 0")
    if not 0 < _SELECT_KEEP < 1 or _SELECT_GROWTH < 1:
        raise common.UserError(f"distill.py's _SELECT_KEEP={_SELECT_KEEP} must lie in (0, 1) and "
                               f"_SELECT_GROWTH={_SELECT_GROWTH} be at least 1")
    per_step = plan["tokens_per_step"]
    if cfg.SELECT_TOKENS < 0 or 0 < cfg.SELECT_TOKENS < per_step:
        raise common.UserError(f"SELECT_TOKENS={cfg.SELECT_TOKENS} is less than one step's "
                               f"{per_step} tokens (GLOBAL_BATCH x SEQ_LEN); 0 ranks zero-shot")
    first, ends, alive = cfg.SELECT_TOKENS // per_step, [], n
    while alive > 1:
        ends.append((ends[-1] if ends else 0) + round(first * _SELECT_GROWTH ** len(ends)))
        alive = kept_after_round(alive)
    if _STOP_AT_STEP is not None and _STOP_AT_STEP < ends[-1]:
        raise common.UserError(f"_STOP_AT_STEP={_STOP_AT_STEP} stops the winner's run after the "
                               f"selection, whose rounds end at step {ends[-1]}: set it above "
                               f"that, or None")
    if ends[-1] > plan["max_steps"]:
        raise common.UserError(f"the selection's {len(ends)} rounds take {ends[-1]} steps, more "
                               f"than the run's {plan['max_steps']}: lower SELECT_TOKENS or raise "
                               f"MAX_STEPS")
    common.print0(f"selection: {n} candidates, {len(ends)} rounds ending at steps {ends} "
                  f"({'flat: every candidate runs every round' if _SELECT_FLAT else 'funnel'})")
    return ends


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's rank correlation of two score lists (tau-a: tied pairs count 0)."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    if not pairs:
        return None
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    return sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def ranking(entries: list[dict], r: int, among: list[int] | None = None) -> list[int]:
    """Indices of `entries` (or of those `among` them) best first by KL after round r (-1:
    zero-shot); ties by zero-shot KL, then by student path, so that the order the candidates
    were given in does not count."""
    def kl(e):
        return e["zero_shot_kl"] if r < 0 else e["kl"][r]
    among = range(len(entries)) if among is None else among
    return sorted(among, key=lambda i: (kl(entries[i]), entries[i]["zero_shot_kl"],
                                        entries[i]["student"]))


def kept_after_round(n: int) -> int:
    """How many of n candidates go on: _SELECT_KEEP of them rounded up, and at least one fewer."""
    return min(n - 1, math.ceil(n * _SELECT_KEEP))


def survivors(entries: list[dict], alive: list[int], r: int) -> list[int]:
    if _SELECT_FLAT:
        return alive
    return ranking(entries, r, alive)[:kept_after_round(len(alive))]


def selection_settings(cfg, runs: list, ms: list, ends: list[int]) -> dict:
    """What a resumed selection must share with the run that began it."""
    return {"knobs": {k: v for k, v in vars(cfg).items() if k not in RESUMABLE - {"SELECT_TOKENS"}},
            "recipe": {k: v for k, v in common.recipe(globals()).items() if k not in RESUMABLE},
            "round_ends": ends,
            "students": [m["student_id"] for m in ms], "teacher": ms[0]["teacher_id"]}


def new_selection(cfg, runs: list, ms: list, ends: list[int]) -> dict:
    """The selection's record (select_root's pare.json, and selection.json next to the winner):
    its settings, one entry per candidate (KL per round), the rounds as they finish, the winner."""
    entries = []
    for run, m in zip(runs, ms):
        shape = common.shape_of(m["s_conf"])
        entries.append({"student": run.STUDENT, "output": run.OUTPUT, "shape": shape,
                        "params": common.param_count(shape, m["s_conf"])["total"],
                        "zero_shot_kl": None, "kl": []})
    return {"stage": "distill-select", "settings": selection_settings(cfg, runs, ms, ends),
            "candidates": entries, "rounds": [], "winner": None, "versions": common.versions(),
            "created": common.now()}


def write_selection(path: Path, record: dict):
    if common.is_first_process():
        common.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def read_selection(select_dir: Path, cfg, runs: list, ms: list, ends: list[int]) -> dict:
    """The record of the selection in `select_dir` to continue (a new one if none), refused with
    a message naming the directory when it was begun with other settings."""
    path = select_dir / common.RECORD
    if not path.is_file():
        return new_selection(cfg, runs, ms, ends)
    try:
        record = json.loads(path.read_text())
        saved = record["settings"]
        record["candidates"], record["rounds"]  # noqa: B018 (keys the resume reads)
    except (ValueError, KeyError, TypeError) as e:
        raise common.UserError(f"{path} is not a selection record ({e}); delete {select_dir}") from None
    now = selection_settings(cfg, runs, ms, ends)
    if saved != now:
        changed = sorted(k for k in now if saved.get(k) != now[k])
        raise common.UserError(f"{select_dir} holds a selection begun with other {changed}; "
                               f"restore them or delete {select_dir} to start again")
    return record


def shape_text(shape: dict) -> str:
    return (f"h{shape['hidden_size']} f{shape['intermediate_size']} "
            f"a{shape['num_attention_heads']}/{shape['num_key_value_heads']} "
            f"L{shape['num_hidden_layers']}")


def selection_table(record: dict, r: int) -> str:
    """The table after round r: candidates best first, KL at each round end so far, rank now
    against the zero-shot rank, and the Kendall tau between those rankings."""
    entries, ends = record["candidates"], record["settings"]["round_ends"][:r + 1]
    head = (f"{'candidate':<24} {'shape':<22} {'params':>8} {'kl@0':>8} "
            + " ".join(f"{f'kl@{e}':>8}" for e in ends) + f" {'rank':>5} {'zero-shot':>9}")
    lines = [head]
    zero = ranking(entries, -1)
    now = ranking(entries, r, [i for i in range(len(entries)) if len(entries[i]["kl"]) > r])
    for i in now + [i for i in zero if i not in now]:
        e = entries[i]
        kls = " ".join(f"{e['kl'][k]:>8.4f}" if k < len(e["kl"]) else f"{'-':>8}"
                       for k in range(len(ends)))
        rank = str(now.index(i) + 1) if i in now else "out"
        lines.append(f"{Path(e['output']).name[:24]:<24} {shape_text(e['shape']):<22} "
                     f"{e['params'] / 1e6:>7.2f}M {e['zero_shot_kl']:>8.4f} {kls} {rank:>5} "
                     f"{zero.index(i) + 1:>9}")
    tau = record["rounds"][r]["kendall_tau"] if r < len(record["rounds"]) else None
    lines.append(f"kendall_tau: {'-' if tau is None else f'{tau:.3f}'} (zero-shot vs after "
                 f"round {r + 1}, over its {len(now)} candidates)")
    return "\n".join(lines)


def shared_value(acc, value: float | None) -> float:
    """The first process's number on every process (only it evaluates without FSDP)."""
    if acc.num_processes == 1:
        return value
    t = torch.tensor(value if common.is_first_process() else 0.0, dtype=torch.float64,
                     device=acc.device)
    return acc.reduce(t, "sum").item()


def adopt_checkpoint(src: Path, root: Path, output: str) -> Path:
    """A copy of candidate checkpoint `src` as the newest one of the run `root` belongs to."""
    final = root / src.name
    if common.is_first_process() and not final.exists():
        mark_checkpoint_root(root, output)
        common.write_atomic(final, lambda tmp: shutil.copytree(src, tmp))
    return final


def select(cfg, runs: list, ms: list, env: dict, ends: list[int], select_dir: Path, root: Path,
           out_dir: Path) -> dict:
    """Distil every candidate round by round (the funnel, or flat), one at a time next to a
    teacher loaded once, from its own checkpoints under `select_dir`; the winner's latest
    checkpoint becomes this run's, and the winner is written to `out_dir` (trained on to the
    schedule's end first when MAX_STEPS is set) with selection.json beside it."""
    acc, plan = env["acc"], env["plan"]
    record = read_selection(select_dir, cfg, runs, ms, ends)
    write_selection(select_dir / common.RECORD, record)  # marks select_dir before any checkpoint
    entries = record["candidates"]
    cached = env["cache"] is not None
    teacher = None if cached else load_teacher(ms[0]["teacher"], str(acc.device), env["dtype"])
    print_memory(ms[0]["s_conf"], None if cached else ms[0]["t_conf"], env["dtype"], 1, env["device"])
    alive = list(range(len(runs)))
    for r, end in enumerate(ends):
        common.print0(f"selection round {r + 1}/{len(ends)}: {len(alive)} candidates to step {end} "
                      f"({(end - (ends[r - 1] if r else 0)) * plan['tokens_per_step']:,} tokens each)")
        for i in alive:
            if len(entries[i]["kl"]) > r:
                continue  # finished by an earlier run of this selection
            s = distill_one(runs[i], ms[i], env, Path(f"{runs[i].OUTPUT}-checkpoints"),
                            Path(runs[i].OUTPUT), end, teacher, always_write=True)
            entries[i]["zero_shot_kl"] = shared_value(acc, s["start"].get("kl"))
            entries[i]["kl"].append(shared_value(acc, s["final"].get("kl")))
            write_selection(select_dir / common.RECORD, record)
        if len(record["rounds"]) <= r:
            zero = [entries[i]["zero_shot_kl"] for i in alive]
            record["rounds"].append({"end_step": end, "candidates": [entries[i]["output"] for i in alive],
                                     "tokens_per_candidate": end * plan["tokens_per_step"],
                                     "kendall_tau": kendall_tau(zero, [entries[i]["kl"][r] for i in alive])})
            write_selection(select_dir / common.RECORD, record)
        common.print0(selection_table(record, r))
        alive = survivors(entries, alive, r)
    best = ranking(entries, len(ends) - 1, alive)[0]
    record["winner"] = entries[best]["output"]
    write_selection(select_dir / common.RECORD, record)
    common.print0(f"selection: winner {runs[best].STUDENT} (KL {entries[best]['kl'][-1]:.4f} after "
                  f"{ends[-1]} steps; zero-shot rank {ranking(entries, -1).index(best) + 1})")
    saved = checkpoints(Path(f"{runs[best].OUTPUT}-checkpoints"))  # none: no round trained
    acc.wait_for_everyone()
    if saved:
        adopt_checkpoint(saved[-1], root, cfg.OUTPUT)
    acc.wait_for_everyone()
    winner = types.SimpleNamespace(**{**vars(cfg), "STUDENT": runs[best].STUDENT})
    go_on = cfg.MAX_STEPS is not None
    summary = distill_one(winner, ms[best], env, root, out_dir,
                          plan["stop"] if go_on else ends[-1], teacher, always_write=not go_on)
    if summary["output"]:
        write_selection(out_dir / "selection.json", record)
    if not go_on:
        common.print0(f"selection: continue the winner's recovery from {root} with "
                      f"`uv run distill.py STUDENT={runs[best].STUDENT!r}` and the other knobs "
                      f"as here")
    return {**summary, "selection": record}


# ---- the run --------------------------------------------------------------------------------

@contextlib.contextmanager
def stop_requests():
    """Ctrl-C or SIGTERM: the first asks the training loop to stop after the current step (it
    writes a checkpoint); the second stops at once. Yields a dict whose "stop" turns True."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise common.Interrupted("stopped at once; the last complete checkpoint, if any, is "
                                     "kept: run the same command again to resume from it")
        flag["stop"] = True
        common.print0(f"\n{signal.Signals(signum).name}: stopping after this step with a "
                      f"checkpoint (once more: stop at once)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def warn_small_run_traps(cfg, plan: dict, device: str):
    """Settings that run but are almost certainly not what was meant."""
    if plan["warmup"] < _WARMUP_STEPS:
        common.print0(f"schedule: warmup {plan['warmup']} steps (_WARMUP_STEPS={_WARMUP_STEPS} "
                      f"capped at a tenth of the {plan['max_steps']} steps)")
    if device == "cpu" and plan["tokens_per_step"] > 64 * 1024:
        common.print0(f"warning: {plan['tokens_per_step']:,} tokens per optimizer step "
                      f"(GLOBAL_BATCH={cfg.GLOBAL_BATCH} x SEQ_LEN={cfg.SEQ_LEN}) on a CPU: at a "
                      f"few hundred tokens/s each step takes hours; for a trial run lower both")


def held_out_rows(cfg, tokenizer) -> tuple[torch.Tensor, int, int]:
    """(EVAL_SAMPLES held-out rows, how many rows and documents of DATASET they take away from
    training)."""
    if not cfg.EVAL_SAMPLES:
        return torch.empty(0, cfg.SEQ_LEN, dtype=torch.long), 0, 0
    position = {"documents": 0, "carry": []}
    rows = common.calibration_rows(_EVAL_DATASET or cfg.DATASET, tokenizer, cfg.EVAL_SAMPLES,
                                   cfg.SEQ_LEN, _SEED, position=position)
    return (rows, 0, 0) if _EVAL_DATASET else (rows, len(rows), position["documents"])


def print_memory(s_conf, t_conf, dtype: torch.dtype, shards: int, device: str):
    """What weights, gradients and optimizer state need per process, before anything loads."""
    need = state_gib(s_conf, t_conf, dtype, shards)
    total = sum(need.values())
    common.print0(f"memory: about {total:.1f} GiB per process before activations (student "
                  f"weights, gradients and AdamW state {need['student']:.1f} GiB, teacher "
                  f"{need['teacher']:.1f} GiB{f', sharded over {shards} processes' if shards > 1 else ''})")
    if device.startswith("cuda"):
        have = torch.cuda.get_device_properties(device).total_memory / 2**30
        if total > 0.9 * have:
            hint = "" if shards > 1 else ": shard both models with FSDP=True over several GPUs"
            common.print0(f"warning: that is more than 90% of this GPU's {have:.0f} GiB; expect "
                          f"out-of-memory{hint}")


def load_pair(cfg, teacher_name: str, configs: tuple, dtype: torch.dtype, device: str,
              shard: bool, rank: int, teacher=None, cached: bool = False):
    """(student in float32, ready to train; teacher in `dtype`, frozen: `teacher` when given,
    None when `cached`, i.e. a teacher cache stands in for it).
    Under FSDP they are read into CPU memory by the first process only (FSDP moves each shard to
    the device as it cuts it); the other processes get empty models of `configs` (student's,
    teacher's) and receive their shards later."""
    if shard and rank > 0:
        student = empty_model(configs[0], torch.float32)
        teacher = None if cached else empty_model(configs[1], dtype)
    else:
        where = "cpu" if shard else device
        student = common.load_model(cfg.STUDENT, where, torch.float32, "STUDENT")
        teacher = None if cached else teacher or load_teacher(teacher_name, where, dtype)
    if teacher is not None:
        teacher.requires_grad_(False)
    if cfg.GRADIENT_CHECKPOINTING:
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.2x
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    student.train()
    return student, teacher


def load_teacher(name: str, device: str, dtype: torch.dtype):
    return common.load_model(name, device, dtype, "TEACHER").requires_grad_(False)


def build_distiller(student, teacher, m: dict, dev: str, shard: bool, world: int, rank: int,
                    bf16: bool, divergence: str = "forward_kl") -> tuple:
    """(Distiller: the student plus the hidden-state map, sharded under FSDP; the hidden-state
    pairs, empty unless the depth cut reaches _HIDDEN_LOSS_DEPTH_CUT and the teacher runs: a
    teacher cache (`teacher` None) holds its logits only). `m`: resolve_models' result."""
    s_conf, record = student.config, m["record"]
    same_source = m["teacher"] == record.get("source_model")
    n_s, n_t = s_conf.num_hidden_layers, m["t_layers"]
    pairs, kept_hidden = [], None
    deep_cut = use_hidden_loss(n_s, n_t, _HIDDEN_LOSS_DEPTH_CUT)
    if deep_cut and teacher is None:
        common.print0(f"warning: the depth cut ({1 - n_s / n_t:.0%} of the layers) would add the "
                      f"hidden-state loss, which a teacher cache cannot give (it holds logits "
                      f"only): training on the logit KL alone")
    elif deep_cut:
        t_conf = teacher.config
        kept = record["kept"]["layers"] if record else list(range(n_s))
        if len(kept) != n_s:
            raise common.UserError(f"{common.RECORD} lists {len(kept)} kept layers but STUDENT "
                                   f"has {n_s}")
        n_source = record["source_shape"]["num_hidden_layers"] if record else n_t
        pairs = hidden_pairs(kept, n_source, n_t, _HIDDEN_LOSS_LAYERS)
        kept_hidden = record["kept"]["hidden"] if record and same_source else None
        proj = make_proj(s_conf.hidden_size, t_conf.hidden_size, kept_hidden)
    settings = {"temperature": _TEMPERATURE, "kl_w": _KL_WEIGHT, "ce_w": _CE_WEIGHT,
                "chunk": _CHUNK_TOKENS, "divergence": divergence}
    model = Distiller(student, proj.to(student.device) if pairs else torch.nn.Identity(), pairs,
                      settings)
    if shard:
        full = ((model.state_dict(), teacher.state_dict() if teacher else {}) if rank == 0
                else ({}, {}))
        shard_models(model, teacher, dev, world, bf16)
        if rank == 0 and teacher:  # the others' lm_head is still empty: broadcast_weights places it
            teacher.lm_head.to(dev)
        broadcast_weights(model, full[0], dev, rank)
        s_mine, s_all = local_share(model)
        held = f"{s_mine:,} of {s_all:,} student parameters"
        if teacher:
            broadcast_weights(teacher, full[1], dev, rank)
            t_mine, t_all = local_share(teacher.model)
            held += f" and {t_mine:,} of {t_all:,} teacher decoder parameters"
        common.print0(f"fsdp: {world} processes; this one holds {held}")
    common.print0(f"hidden_loss: {'on, (student, teacher) hidden states ' + str(pairs) if pairs else 'off'} "
                  f"(depth cut {1 - n_s / n_t:.0%}, threshold {_HIDDEN_LOSS_DEPTH_CUT:.0%})")
    return model, pairs


def make_optimizer(model, lr: float, plan: dict):
    """AdamW (beta2 _BETA2) and warmup then cosine decay from `lr` to _MIN_LR."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  betas=(0.9, _BETA2), weight_decay=_WEIGHT_DECAY)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, plan["warmup"], plan["max_steps"], min_lr_rate=_MIN_LR / lr if lr else 0.0)
    return optimizer, scheduler


def train_step(model, teacher, rows: torch.Tensor, plan: dict, pairs: list, acc, shard: bool,
               dev: str, cached: dict | None = None, mask: torch.Tensor | None = None) -> dict:
    """One optimizer step's forward and backward over this process's `rows` in micro-batches
    (gradients clipped, not yet applied): the mean loss, KL, CE, hidden loss and gradient norm
    over all processes. `cached`: the rows' targets from a teacher cache (then no teacher runs);
    `mask`: the predictions that carry loss (on-policy rows; None: all)."""
    micro = rows.view(plan["accum"], -1, rows.shape[-1]).to(dev)
    masks = (mask.view(plan["accum"], -1, mask.shape[-1]).to(dev) if mask is not None
             else [None] * len(micro))
    weights = [1 / len(micro)] * len(micro)  # of each micro-batch's mean loss
    if mask is not None:  # sampled rows differ in length: every sampled token of the step weighs
        counts = masks.sum((1, 2)).double()  # the same, over micro-batches and processes
        n_all = acc.reduce(counts.sum(), "sum") if acc.num_processes > 1 else counts.sum()
        weights = (counts * acc.num_processes / n_all).tolist()
    total = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, kl, ce, hid
    for k, ids in enumerate(micro):
        target, t_states = None, {}
        if cached is not None and _KL_WEIGHT > 0:
            part = slice(k * len(ids), (k + 1) * len(ids))
            target = ("topk", *(cached[n][part].flatten(0, 1).to(dev) for n in ("ids", "logp", "rest")))
        elif _KL_WEIGHT > 0 or pairs:
            with torch.no_grad(), acc.autocast(), hidden_states(teacher, [j for _, j in pairs]) as t_states:
                t_last = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            if _KL_WEIGHT > 0:
                target = ("logits", t_last[:, :-1].flatten(0, 1), teacher.lm_head.weight)
        # FSDP reduce-scatters every micro-batch's gradients: skipping that would keep whole
        # float32 gradients on every process until the last one
        sync = acc.no_sync(model) if k < len(micro) - 1 and not shard else contextlib.nullcontext()
        with sync:
            loss, stats, hid, n_tok = model(ids, target, t_states, masks[k])
            acc.backward(loss * weights[k])
        total += torch.stack([loss.detach().double(), stats[0] / n_tok, stats[1] / n_tok,
                              hid.double()]) * weights[k]
    if shard:
        grad = torch.nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP)
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    else:
        grad = acc.clip_grad_norm_(model.parameters(), _GRAD_CLIP)
    loss, kl, ce, hid = acc.reduce(total, "mean").tolist()
    return {"loss": loss, "kl": kl, "ce": ce, "hid": hid, "grad": float(grad)}


def check_loss(m: dict, step: int, ref_loss: float, root: Path):
    """Stop on a NaN or an exploding loss (the checkpoints before it are kept)."""
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad"])):
        raise common.UserError(f"loss is {m['loss']}, gradient norm {m['grad']} at step {step}: "
                               f"training diverged; lower LR or check the data (checkpoints: {root})")
    if m["loss"] > _ABORT_LOSS_FACTOR * max(ref_loss, 1e-2):
        raise common.UserError(f"loss exploded at step {step}: {m['loss']:.4f} > "
                               f"{_ABORT_LOSS_FACTOR} x the first step's {ref_loss:.4f}; lower LR "
                               f"(checkpoints: {root})")


def log_line(step: int, plan: dict, m: dict, lr: float, dt: float, pairs: list,
             sampled: bool = False) -> str:
    """One step's line; `kl` is DIVERGENCE's value, `sampled` marks an on-policy step."""
    kl = f"{m['kl']:.4f}" if _KL_WEIGHT else "-"  # not computed
    hid = f"{m['hid']:.4f}" if pairs else "-"
    return (f"step {step:>6}/{plan['max_steps']} | loss {m['loss']:.4f} | kl {kl} | "
            f"ce {m['ce']:.4f} | hid {hid} | lr {lr:.2e} | grad {m['grad']:.3f} | "
            f"{plan['tokens_per_step'] / dt:,.0f} tok/s | {dt:.2f}s{' | sampled' if sampled else ''}")


def held_out(inner, rows: torch.Tensor, teacher, acc, batch_size: int, cache=None) -> dict:
    """Held-out KL and perplexity of the student (every process under FSDP, else the first),
    against the live teacher or its `cache`."""
    if not len(rows):
        return {}
    inner.student.eval()
    with acc.autocast():
        m = inner.held_out(rows.to(acc.device), batch_size, teacher, _CHUNK_TOKENS, cache)
    inner.student.train()
    return m


def write_output(model, inner, cfg, m: dict, summary: dict, pairs: list, shard: bool, world: int,
                 out_dir: Path, cache=None):
    """The final HF directory (first process), its pare.json extending the student's."""
    student = full_student(model, cfg.STUDENT) if shard else (
        inner.student if common.is_first_process() else None)
    if student is None:
        return
    record = dict(m["record"]) if m["record"] else {"source_model": m["teacher"]}
    shape = common.shape_of(m["s_conf"])
    record.update(stage="distill", versions=common.versions(), lineage=common.lineage(
        cfg.STUDENT, shape, m["student_id"], "STUDENT"), distill={
        "config": vars(cfg), "recipe": common.recipe(globals()), "student": cfg.STUDENT,
        "student_fingerprint": m["student_id"], "teacher": m["teacher"],
        "teacher_fingerprint": m["teacher_id"], "steps": summary["steps"],
        "tokens_seen": summary["tokens"], "processes": world, "fsdp": shard,
        "throughput": {k: summary[k] for k in ("tokens_per_s", "tflops_per_device", "mfu",
                                               "peak_memory_gib", "sampling")},
        "hidden_loss_pairs": pairs, "metrics": {"start": summary["start"], "final": summary["final"]},
        "teacher_cache": cache and {"path": str(cache.path), **{k: cache.manifest[k] for k in (
            "topk", "dtype", "rows", "tokenizer")}},
        "created": common.now()})
    common.write_checkpoint(student, cfg.STUDENT, out_dir, record,
                            dtype=common.stored_dtype(m["s_conf"]))


def print_summary(s: dict, mem_kind: str):
    common.print0(f"steps: {s['steps']}/{s['max_steps']}")
    common.print0(f"tokens: {s['tokens']}")
    common.print0(f"tokens_per_s: {s['tokens_per_s']:.1f}")  # training steps, all processes
    common.print0(f"tflops_per_device: {s['tflops_per_device']:.4g}")
    if s["mfu"] is not None:
        common.print0(f"mfu: {s['mfu']:.3f}")
    common.print0(f"peak_memory_gib: {s['peak_memory_gib']:.2f} ({mem_kind}, first process)")
    if s.get("sampling"):
        common.print0(f"sampled_steps: {s['sampling']['steps']}")
        common.print0(f"sampled_tokens_per_s: {s['sampling']['tokens_per_s']:.1f}")
        common.print0(f"sampling_share: {s['sampling']['share_of_step_time']:.3f}")
    if s["losses"]:
        common.print0(f"loss_first: {s['losses'][0]:.4f}")
        common.print0(f"loss_last: {s['losses'][-1]:.4f}")
    for name in ("start", "final"):
        if s[name]:
            common.print0(f"{name}_kl: {s[name]['kl']:.4f}")
            common.print0(f"{name}_ppl: {s[name]['student_ppl']:.3f}")
    if s["start"]:
        common.print0(f"teacher_ppl: {s['start']['teacher_ppl']:.3f}")
    common.print0(f"output: {s['output'] or 'none (stopped early; rerun to resume)'}")


def start_processes(cfg, device: str):
    """The Accelerator and how this run is spread: (acc, world, rank, shard)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    acc = Accelerator(cpu=device == "cpu",
                      mixed_precision="bf16" if device.startswith("cuda") else "no")
    if acc.distributed_type == DistributedType.FSDP:
        raise common.UserError("distill.py shards with FSDP=True (FSDP2, tested), not with "
                               "accelerate's FSDP plugin: launch without --use_fsdp and set "
                               "FSDP=True")
    world, rank = acc.num_processes, acc.process_index
    if cfg.FSDP and world < 2:
        raise common.UserError("FSDP=True shards the models over several processes; start them "
                               "with `accelerate launch --num_processes N distill.py FSDP=True`")
    return acc, world, rank, cfg.FSDP


def main(argv: list[str]) -> dict:
    cfg = common.configure(globals(), argv)
    check_knobs(cfg)
    runs = candidates(cfg)  # one run's knobs per student: several when selecting between them
    ms = [resolve_models(c) for c in runs]
    check_candidates(runs, ms)
    inputs = {"TEACHER": ms[0]["teacher"], "DATASET": cfg.DATASET, "_EVAL_DATASET": _EVAL_DATASET,
              **{f"STUDENT {c.STUDENT!r}": c.STUDENT for c in runs}}
    if cfg.TEACHER_CACHE:  # read and written: never an input, and never inside an output
        common.check_output(cfg.TEACHER_CACHE, "TEACHER_CACHE", inputs,
                            lambda p: common.is_record_of(p, "teacher-cache"))
        inputs["TEACHER_CACHE"] = cfg.TEACHER_CACHE
    out_dir = common.check_output(cfg.OUTPUT, "OUTPUT", inputs,
                                  lambda p: common.is_record_of(p, "distill"))
    root = common.check_output(f"{cfg.OUTPUT.rstrip('/')}-checkpoints", "OUTPUT's checkpoint "
                               "directory", inputs, is_checkpoint_root)
    select_dir = (common.check_output(select_root(cfg), "OUTPUT's selection directory", inputs,
                                      lambda p: common.is_record_of(p, "distill-select"))
                  if len(runs) > 1 else None)
    device = common.pick_device(cfg.DEVICE)
    acc, world, rank, shard = start_processes(cfg, device)
    plan = schedule(cfg, world)
    rounds = funnel(cfg, plan, len(runs), shard) if select_dir else None
    warn_small_run_traps(cfg, plan, device)
    eval_rows, held, held_docs = held_out_rows(cfg, ms[0]["tokenizer"])  # before any model loads
    env = {"acc": acc, "world": world, "rank": rank, "shard": shard, "plan": plan,
           "device": device, "dtype": common.pick_dtype(_DTYPE, device), "eval_rows": eval_rows,
           "held": held, "cache": None, "prompt_start": prompt_start(held_docs)}
    if cfg.ON_POLICY > 0:  # sampling settings and the first step's prompts, before any load
        for m in ms:
            check_generation(cfg, m["s_conf"], m["tokenizer"])
        first = prompt_stream(cfg.DATASET, ms[0]["tokenizer"], cfg.SEQ_LEN, _SEED,
                              dict(env["prompt_start"]))
        for _ in range(cfg.GLOBAL_BATCH):
            next(first)
    if cfg.TEACHER_CACHE:  # the rows of the whole run: the winner's too when selecting
        if select_dir is None:  # a run that could not resume is refused before the fill
            latest_progress(cfg, ms[0], root, shard, world)
        else:
            read_selection(select_dir, cfg, runs, ms, rounds)
        last = rounds[-1] if rounds and cfg.MAX_STEPS is None else plan["stop"]
        env["cache"] = prepare_cache(cfg, ms[0], env, last * cfg.GLOBAL_BATCH)
    if select_dir is None:
        summary = distill_one(cfg, ms[0], env, root, out_dir, plan["stop"])
    else:
        summary = select(cfg, runs, ms, env, rounds, select_dir, root, out_dir)
    acc.wait_for_everyone()
    if env["cache"]:
        summary["cache_filled"] = env["cache"].filled
    print_summary(summary, "cuda allocated" if device.startswith("cuda") else "process RSS")
    return summary


def distill_one(cfg, m: dict, env: dict, root: Path, out_dir: Path, stop: int, teacher=None,
                always_write: bool = False) -> dict:
    """One student's run from its latest checkpoint under `root` (none: the start) to step
    `stop` of env["plan"]: check it may resume, read its first batch, load (the teacher too,
    unless given), build, train, and write `out_dir` when the schedule is done (or
    `always_write`). Returns the run summary."""
    acc, world, rank, shard = env["acc"], env["world"], env["rank"], env["shard"]
    plan = dict(env["plan"], stop=stop, checkpoint_at_stop=always_write or stop < env["plan"]["max_steps"])
    saved, progress = latest_progress(cfg, m, root, shard, world)
    data = {"eval_rows": env["eval_rows"],
            "position": progress["data"] if progress else start_position()}
    data["stream"] = row_stream(cfg.DATASET, m["tokenizer"], cfg.SEQ_LEN, _SEED, env["held"],
                                data["position"])  # keeps data["position"] up to date
    data["prompt_position"] = dict((progress or {}).get("prompts") or env["prompt_start"])
    data["prompts"] = (prompt_stream(cfg.DATASET, m["tokenizer"], cfg.SEQ_LEN, _SEED,
                                     data["prompt_position"], strict=False)
                       if cfg.ON_POLICY > 0 else None)
    step = progress["step"] if progress else 0
    data["first"] = next_batch(cfg, data, step + 1, rank, world) if step < stop else None

    if teacher is None:
        print_memory(m["s_conf"], None if env["cache"] else m["t_conf"], env["dtype"],
                     world if shard else 1, env["device"])
    from accelerate.utils import set_seed
    set_seed(_SEED)
    t0 = time.time()
    student, teacher = load_pair(cfg, m["teacher"], (m["s_conf"], m["t_conf"]), env["dtype"],
                                 str(acc.device), shard, rank, teacher, env["cache"] is not None)
    model, pairs = build_distiller(student, teacher, m, str(acc.device), shard, world, rank,
                                   env["device"].startswith("cuda"), cfg.DIVERGENCE)
    optimizer, scheduler = make_optimizer(model, cfg.LR, plan)
    if cfg.ON_POLICY > 0 and rank > 0:  # each process samples with its own random numbers (a
        torch.manual_seed(_SEED + rank)  # resumed run restores its saved state below instead)
    if not shard:
        model, optimizer = acc.prepare(model, optimizer)
    if progress:
        (load_sharded(saved[-1], model, optimizer, rank) if shard else
         load_state(saved[-1], acc.unwrap_model(model), optimizer, rank, str(acc.device)))
        scheduler.load_state_dict(progress["scheduler"])
        common.print0(f"resume: {saved[-1]} (step {step}, {progress['tokens']} tokens seen)")
    common.print0(f"models: student {cfg.STUDENT} {m['s_conf'].architectures} "
                  f"{m['s_conf'].num_hidden_layers} layers, teacher {m['teacher']} "
                  f"{m['t_layers']} layers{' (from its cache)' if env['cache'] else ''}, on "
                  f"{acc.device} ({world} "
                  f"process{'es' if world > 1 else ''}), loaded in {time.time() - t0:.1f}s")
    common.print0(f"batch: {cfg.GLOBAL_BATCH} rows x {cfg.SEQ_LEN} tokens = "
                  f"{plan['tokens_per_step']} tokens/step = {world} processes x {plan['accum']} "
                  f"micro-batches x {cfg.BATCH_SIZE} rows; {plan['max_steps']} steps = "
                  f"{plan['max_steps'] * plan['tokens_per_step'] / 1e6:.2f}M tokens")
    summary = train(cfg, model, teacher, optimizer, scheduler, acc, data, plan, pairs, shard, root,
                    progress, m, env["cache"])
    if summary["finished"] or always_write:
        write_output(model, acc.unwrap_model(model) if not shard else model, cfg, m, summary,
                     pairs, shard, world, out_dir, env["cache"])
        summary["output"] = str(out_dir)
    acc.free_memory()  # the accelerator forgets this student and its optimizer
    return summary


def train(cfg, model, teacher, optimizer, scheduler, acc, data: dict, plan: dict, pairs: list,
          shard: bool, root: Path, progress: dict | None, m: dict, cache=None) -> dict:
    """The training loop from the checkpoint `progress` (None: the start) to plan["stop"]:
    steps, log lines, held-out evaluations, checkpoints, and a checkpoint then a stop on the
    first Ctrl-C or SIGTERM. `data`: the row stream, its position, the first batch (already read,
    so that data errors come before loading) and the held-out rows; `m`: resolve_models' result;
    `cache`: the TeacherCache that replaces `teacher` (None: the live teacher). Returns the run
    summary."""
    dev, world, rank = str(acc.device), acc.num_processes, acc.process_index
    settings = {**vars(cfg), **common.recipe(globals())}
    eval_rows, first = data["eval_rows"], data["first"]
    inner = model if shard else acc.unwrap_model(model)
    evaluating = common.is_first_process() or shard  # under FSDP every process takes part
    step, tokens = (progress["step"], progress["tokens"]) if progress else (0, 0)
    ref_loss = progress["ref_loss"] if progress else {}  # the first loss of each kind of step
    ref_loss = {"rows": ref_loss} if isinstance(ref_loss, float) else ref_loss  # older checkpoints
    start = progress["start"] if progress else {}
    if not progress and evaluating:
        start = held_out(inner, eval_rows, teacher, acc, cfg.BATCH_SIZE, cache)
        if start:
            common.print0(f"teacher: held-out ppl {start['teacher_ppl']:.3f} on {start['tokens']} "
                          f"tokens (reference)")
            common.print0(f"eval step {0:>6} | kl {start['kl']:.4f} | ppl {start['student_ppl']:.3f}")
    peak = peak_tflops(dev, _PEAK_TFLOPS)
    t_flops = (forward_flops_per_token(teacher.config, cfg.SEQ_LEN, lm_head=_KL_WEIGHT > 0)
               if (_KL_WEIGHT > 0 or pairs) and cache is None else 0)
    flops_token = 3 * forward_flops_per_token(inner.student.config, cfg.SEQ_LEN) + t_flops
    common.print0(f"flops: {flops_token / 1e9:.3f} GFLOP per token (student forward+backward 3x"
                  f"{', teacher forward 1x' if t_flops else ', no teacher forward'}); MFU against "
                  f"{f'{peak:g} TFLOP/s per device' if peak else 'no known peak (_PEAK_TFLOPS)'}")

    # the held-out metrics of the last step: at step 0 the start's; a resumed run measures again
    losses, metrics, t_train, tok_run = [], start if step == 0 else {}, 0.0, 0
    eos = end_tokens(m["s_conf"], m["tokenizer"])
    pad = m["tokenizer"].pad_token_id if m["tokenizer"].pad_token_id is not None else eos[0]
    sampling = {"seconds": 0.0, "tokens": 0, "steps": 0}  # this process's on-policy sampling
    bar = tqdm(total=plan["stop"], initial=step, desc="distill", disable=not common.is_first_process())
    with stop_requests() as request:
        while step < plan["stop"]:
            t0 = time.time()
            kind, rows = first if first is not None else next_batch(cfg, data, step + 1, rank, world)
            first, mask = None, None
            if kind == "sample":  # the student continues the prompts; only its tokens carry loss
                t_sample = time.time()
                rows, mask, n = sample_rows(inner.student, rows, cfg.SEQ_LEN, eos, pad, acc)
                sampling["seconds"] += time.time() - t_sample
                sampling["tokens"], sampling["steps"] = sampling["tokens"] + n, sampling["steps"] + 1
            cached = (cache.train_rows(step * cfg.GLOBAL_BATCH + rank * len(rows), rows)
                      if cache is not None else None)  # this process's rows of the global batch
            s = train_step(model, teacher, rows, plan, pairs, acc, shard, dev, cached, mask)
            ref_loss.setdefault(kind, s["loss"])  # sampled rows' losses are on another scale
            check_loss(s, step + 1, ref_loss[kind], root)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, tokens = step + 1, tokens + plan["tokens_per_step"]
            dt = time.time() - t0
            t_train, tok_run = t_train + dt, tok_run + plan["tokens_per_step"]
            losses.append(s["loss"])
            bar.update(1)
            if step % _LOG_EVERY == 0 or step == plan["stop"]:
                common.print0(log_line(step, plan, s, lr, dt, pairs, kind == "sample"))
            if len(eval_rows) and (step % _EVAL_EVERY == 0 or step == plan["stop"]) and evaluating:
                metrics = held_out(inner, eval_rows, teacher, acc, cfg.BATCH_SIZE, cache)
                common.print0(f"eval step {step:>6} | kl {metrics['kl']:.4f} | ppl "
                              f"{metrics['student_ppl']:.3f}")
            stop = request["stop"] and step < plan["max_steps"]
            if world > 1:  # every process stops at the same step
                stop = bool(acc.reduce(torch.tensor(float(stop), device=dev), "sum").item())
            if stop or (_CHECKPOINT_EVERY and step % _CHECKPOINT_EVERY == 0) or (
                    step == plan["stop"] and plan["checkpoint_at_stop"]):
                path = save_checkpoint(root, step, model, optimizer, acc, shard, dict(
                    step=step, tokens=tokens, world=world, fsdp=shard, data=data["position"],
                    prompts=data["prompt_position"],
                    ref_loss=ref_loss, start=start, settings=settings, student=m["student_id"],
                    teacher=m["teacher_id"], scheduler=scheduler.state_dict()))
            if stop:
                bar.close()
                raise common.Interrupted(f"stopped after step {step}: checkpoint {path}; run the "
                                         f"same command again to resume")
    bar.close()
    if not metrics and len(eval_rows) and evaluating:  # resumed at the last step: nothing ran
        metrics = held_out(inner, eval_rows, teacher, acc, cfg.BATCH_SIZE, cache)
    tok_s = tok_run / t_train if tok_run else 0.0
    tflops = tok_s * flops_token / world / 1e12  # per device
    sampled = None
    if cfg.ON_POLICY > 0:  # sampled tokens of all processes per second of sampling
        n = acc.reduce(torch.tensor(float(sampling["tokens"]), device=dev), "sum").item()
        sampled = {"steps": sampling["steps"], "tokens": n,
                   "tokens_per_s": n / sampling["seconds"] if sampling["seconds"] else 0.0,
                   "share_of_step_time": sampling["seconds"] / t_train if t_train else 0.0}
    return {"steps": step, "max_steps": plan["max_steps"], "tokens": tokens, "losses": losses,
            "start": start, "final": metrics, "tokens_per_s": tok_s, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None, "peak_memory_gib": peak_memory_gib(dev)[0],
            "sampling": sampled, "finished": step >= plan["max_steps"], "output": None}


if __name__ == "__main__":
    common.run(main)
