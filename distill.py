"""Stage 3 of Pare: recover a pruned student by distilling the teacher's logits (Minitron).

    uv run distill.py                                       # out/pruned -> out/distilled
    uv run distill.py DATASET=notes.txt SEQ_LEN=256 GLOBAL_BATCH=8 MAX_STEPS=100
    uv run accelerate launch --num_processes 8 distill.py    # 8 GPUs (DDP), same knobs

Forward KL(teacher || student) on the logits at temperature 1, no cross-entropy (P1 Tables
15-16), a chunk of tokens at a time; plus a cosine loss on mapped hidden states after a large
depth cut. The options live in flat modules imported only when their knob is on:
teacher_cache.py (TEACHER_CACHE), on_policy.py (ON_POLICY), selection.py (several STUDENTs),
sharding.py (FSDP); checkpoints.py holds the checkpoint format, costs.py the FLOP and memory
arithmetic. README.md is the manual.
"""

import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import common
import costs

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
# Downstream accuracy at each held-out evaluation (benchmarks.py): its tasks ([]: none) and the
# first documents of each (ARC-Easy and PIQA 0-shot, MMLU: about a minute on a CPU for SmolLM2).
_EVAL_TASKS = ["arc_easy:rc_0shot", "piqa:rc_0shot", "mmlu"]
_EVAL_TASK_DOCS = 50
_TRACKER = None                        # step metrics to accelerate's 'tensorboard' or 'wandb' (installed)
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
             "_KEEP_CHECKPOINTS", "_STOP_AT_STEP", "_PEAK_TFLOPS", "_EVAL_TASKS", "_EVAL_TASK_DOCS",
             "_TRACKER"}  # FSDP: checked as the format


# ---- the loss -------------------------------------------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")  # DIVERGENCE's values


def student_side_divergence(ls, lt, divergence: str, beta: float):
    """Summed divergence of N tokens between the student's and the teacher's log-probabilities
    `ls`, `lt` [N, vocab] (at the loss's temperature), and its gradient w.r.t. the student's
    (tempered) logits. "reverse_kl": KL(student || teacher), the on-policy recipe's choice
    (mode-seeking). "jsd": GKD's generalized Jensen-Shannon divergence (arXiv 2306.13649, eq. 3)
    beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s. Both have the form
    c KL(s || r) + const. in the student's logits z, with r = t (c = 1) or m (c = 1 - beta; m's
    own dependence on z cancels), so d/dz = c p_s (log p_s - log r - KL(s || r)).
    """
    ps = ls.exp()
    if divergence == "reverse_kl":
        ref, c = lt, 1.0
    else:
        ref, c = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta)), 1 - beta
    diff = ls - ref
    to_ref = (ps * diff).sum(-1, keepdim=True)          # KL(s || r) per token
    value = to_ref.sum(dtype=torch.float64)
    if divergence == "jsd":
        value = (1 - beta) * value + beta * (lt.exp() * (lt - ref)).sum(dtype=torch.float64)
    return value, diff.sub_(to_ref).mul_(ps).mul_(c)


class ChunkedDistillLoss(torch.autograd.Function):
    """Logit loss of N tokens with full-vocabulary logits for only `chunk` tokens at a time.

    loss = (kl_w * T^2 * sum KL(q_t || softmax(z_s/T)) + ce_w * sum CE(z_s, y)) / N (or another
    `divergence` than this forward KL: `student_side_divergence`, with `beta` for JSD) with
    z_s = h_s @ W_s^T. The teacher `q_t` is ("logits", h_t, W_t): softmax(h_t @ W_t^T / T), or
    ("topk", ids, logp, rest) from a teacher cache: its top-k log-probabilities plus one bucket
    for the rest (see `common.topk_kl`); None when only CE is trained. The gradient w.r.t. the
    student's logits is known in closed form, (kl_w * T * (p_s - target) + ce_w * (softmax(z_s)
    - onehot(y))) / N, so each chunk's gradients w.r.t. h_s and W_s are computed in forward and
    the chunk's logits freed; backward only scales them. Also returns (non-differentiable)
    summed KL and CE for logging.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, teacher, labels, temperature, kl_w, ce_w, chunk, divergence, beta):
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
                    kl, pt = common.topk_kl(ls, *(t[i:i + chunk] for t in teacher[1:]), target=True)
                else:
                    z_t = (teacher[1][i:i + chunk] @ teacher[2].T).to(wide)
                    lt = (z_t if temperature == 1 else z_t / temperature).log_softmax(-1)
                    del z_t
                    if divergence == "forward_kl":
                        pt = lt.exp()
                        kl = torch.dot(pt.flatten(), lt.sub_(ls).flatten()).double()  # lt spent
                    else:
                        kl, grad = student_side_divergence(ls, lt, divergence, beta)
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
                None, None, None, None, None, None, None, None)


def logit_loss(h_s, w_s, teacher, labels, temperature=1.0, kl_w=1.0, ce_w=0.0, chunk=1024,
               divergence="forward_kl", beta=0.5):
    """Chunked logit loss of flattened tokens: (scalar loss, [divergence sum, ce_sum]) over N
    tokens. `teacher`: ("logits", h_t, w_t), ("topk", ids, logp, rest) or None (see
    ChunkedDistillLoss); `divergence`: DIVERGENCE (a teacher cache: forward_kl only), `beta`:
    JSD's teacher weight."""
    return ChunkedDistillLoss.apply(h_s, w_s, teacher, labels, float(temperature), float(kl_w),
                                    float(ce_w), int(chunk), divergence, float(beta))


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


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The logit loss's recipe (distill.py's _TEMPERATURE, _KL_WEIGHT, _CE_WEIGHT, _CHUNK_TOKENS,
    _JSD_BETA) and DIVERGENCE."""
    temperature: float
    kl_weight: float
    ce_weight: float
    chunk: int
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5



# ---- the models -----------------------------------------------------------------------------

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


class Distiller(torch.nn.Module):
    """The student and the shared hidden-state map as one module, so that DDP synchronises every
    trainable weight; `forward` is one micro-batch's loss given the teacher's outputs."""

    def __init__(self, student, proj, pairs, loss: LossSettings):
        super().__init__()
        self.student, self.proj, self.pairs, self.loss = student, proj, pairs, loss

    def forward(self, ids, target, t_states, mask=None):
        """Loss of one micro-batch `ids` given the teacher's targets for its predicted tokens
        (`logit_loss`'s `teacher`: from its final hidden states and lm_head, or from a cache;
        None when only CE is trained) and its hidden states at the paired indices `t_states`.
        `mask` [rows, SEQ_LEN - 1]: the predictions that carry loss (an on-policy row's sampled
        tokens; None: all)."""
        s = self.loss
        with hidden_states(self.student, [i for i, _ in self.pairs]) as s_states:
            out = self.student.model(input_ids=ids, use_cache=False)
        h_s = out.last_hidden_state[:, :-1].flatten(0, 1)
        labels = ids[:, 1:].flatten()
        keep = mask.flatten() if mask is not None else slice(None)
        if mask is not None and target is not None:
            target = (target[0], target[1][keep], *target[2:])
        loss, stats = logit_loss(h_s[keep], self.student.lm_head.weight, target, labels[keep],
                                 s.temperature, s.kl_weight, s.ce_weight, s.chunk, s.divergence,
                                 s.jsd_beta)
        hid = torch.zeros((), device=loss.device)
        if self.pairs:
            def at(h):  # the positions that predict a token carrying loss
                return h if mask is None else h[:, :-1][mask]
            hid = sum(cosine_loss(self.proj(at(s_states[i])), at(t_states[j]))
                      for i, j in self.pairs) / len(self.pairs)
            # Minitron: the intermediate loss is rescaled to the logit loss's magnitude
            loss = loss + hid * (loss.detach() / hid.detach().clamp(min=1e-8))
        return loss, stats, hid.detach(), len(labels[keep])

    def held_out(self, rows, batch_size, teacher, cached=None, suite=None, tokenizer=None):
        """common.evaluate of the student against the live teacher or a cache's targets, and
        its accuracy on a downstream `suite` (benchmarks.py) when given (a method, so that FSDP
        can gather it for the call)."""
        m = (common.evaluate(self.student, rows, batch_size, teacher, self.loss.chunk,
                             cached=cached) if len(rows) else {})
        if suite:
            import benchmarks
            m["downstream"] = {k: r["primary"] for k, r in benchmarks.score_suite(
                self.student, tokenizer, suite, batch_size).items()}
            m["accuracy"] = sum(m["downstream"].values()) / len(m["downstream"])
        return m


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


@dataclasses.dataclass
class Models:
    """A student and its teacher, resolved and checked to belong together before any weights
    load (`resolve_models`)."""
    student: str          # STUDENT: the directory
    student_id: str       # its fingerprint (content)
    record: dict          # its pare.json ({} when Pare did not write it)
    s_conf: object
    tokenizer: object     # the student's (the teacher's is the same)
    teacher: str          # hub id or directory
    teacher_id: str
    t_conf: object | None  # None: a teacher cache stands in and the teacher's files are not read
    t_layers: int

    def ids(self) -> dict:
        """The fingerprints a checkpoint is checked against."""
        return {"student": self.student_id, "teacher": self.teacher_id}


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


def live_teacher(cfg, record: dict, s_conf, tokenizer) -> tuple:
    """(teacher name, fingerprint, config) of TEACHER, else of the source in STUDENT's record,
    checked to share the student's tokenizer; the recorded source must still be the model it
    was pruned from (by content)."""
    teacher, constant = cfg.TEACHER, "TEACHER"
    if teacher is None:
        if "source_model" not in record:
            raise common.UserError(f"STUDENT={cfg.STUDENT!r} has no {common.RECORD} naming its "
                                   f"source model; set TEACHER")
        teacher = record["source_model"]
        constant = f"source_model in {Path(cfg.STUDENT) / common.RECORD}"
        now = common.fingerprint(teacher, constant) if common.model_files(teacher) else None
        if now is not None and record.get("source_fingerprint") not in (None, now):
            raise common.UserError(f"{teacher!r} ({constant}) holds other weights now than the "
                                   f"model STUDENT was pruned from (fingerprint "
                                   f"{record['source_fingerprint']}, now {now}); set TEACHER to "
                                   f"that model")
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
    return common.recorded_name(teacher), common.fingerprint(teacher, constant), t_conf


def cache_data(cfg, eval_dataset: str | None, seed: int) -> dict:
    """The settings that decide which rows a teacher cache holds, in which order."""
    return {"DATASET": cfg.DATASET, "SEQ_LEN": cfg.SEQ_LEN, "EVAL_SAMPLES": cfg.EVAL_SAMPLES,
            "_EVAL_DATASET": eval_dataset, "_SEED": seed,
            "data_fingerprint": common.data_fingerprint(cfg.DATASET)}


def resolve_models(cfg) -> Models:
    """Student record, teacher, configs, tokenizer and fingerprints, checked to belong together.
    With a TEACHER_CACHE that exists, its manifest names the teacher, whose files are not read
    (a cache that holds the rows needed works without them)."""
    if not Path(cfg.STUDENT).is_dir():
        raise common.UserError(f"STUDENT={cfg.STUDENT!r} is not a directory; run prune.py first "
                               f"or set STUDENT to the pruned model's directory")
    s_conf = common.load_config(cfg.STUDENT, "STUDENT")
    common.family_of(s_conf, "STUDENT")
    # a student from elsewhere may have no record (then TEACHER names the teacher); prune.py's
    # record must hold what distill reads: the teacher, and the kept layers and channels
    record = common.read_record(cfg.STUDENT, ("stage", "source_model", "source_shape", "kept")) or {}
    tokenizer = common.load_tokenizer(cfg.STUDENT, "STUDENT")
    student = (common.recorded_name(cfg.STUDENT), common.fingerprint(cfg.STUDENT, "STUDENT"),
               record, s_conf, tokenizer)
    if cfg.TEACHER_CACHE:  # an existing cache names its teacher: (name, fingerprint, layers)
        import teacher_cache
        teacher = teacher_cache.teacher_of(cfg.TEACHER_CACHE, cache_data(cfg, _EVAL_DATASET, _SEED), cfg.TOPK,
                                           cfg.TEACHER, cfg.STUDENT, s_conf, tokenizer)
        if teacher is not None:
            return Models(*student, teacher[0], teacher[1], None, teacher[2])
    teacher, teacher_id, t_conf = live_teacher(cfg, record, s_conf, tokenizer)
    return Models(*student, teacher, teacher_id, t_conf, t_conf.num_hidden_layers)


def load_teacher(name: str, device: str, dtype: torch.dtype):
    """The teacher, frozen (the one place distill.py loads it: tests watch it)."""
    return common.load_model(name, device, dtype, "TEACHER").requires_grad_(False)


def load_pair(cfg, m: Models, dtype: torch.dtype, device: str, shard: bool, rank: int,
              teacher=None, cached: bool = False):
    """(student in float32, ready to train; teacher in `dtype`, frozen: `teacher` when given,
    None when `cached`, i.e. a teacher cache stands in for it).
    Under FSDP they are read into CPU memory by the first process only (FSDP moves each shard to
    the device as it cuts it); the other processes get empty models of the configs and receive
    their shards later."""
    if shard and rank > 0:
        import sharding
        student = sharding.empty_model(m.s_conf, torch.float32)
        teacher = None if cached else sharding.empty_model(m.t_conf, dtype)
    else:
        where = "cpu" if shard else device
        student = common.load_model(cfg.STUDENT, where, torch.float32, "STUDENT")
        teacher = None if cached else teacher or load_teacher(m.teacher, where, dtype)
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


def hidden_loss_pairs(m: Models, teacher, n_layers: int, depth_cut: float) -> list:
    """The (student, teacher) hidden-state pairs of the hidden-state loss: none unless the
    student lost `depth_cut` of the teacher's layers and the teacher runs (a teacher cache,
    `teacher` None, holds its logits only)."""
    n_s, n_t = m.s_conf.num_hidden_layers, m.t_layers
    if not use_hidden_loss(n_s, n_t, depth_cut):
        return []
    if teacher is None:
        common.print0(f"warning: the depth cut ({1 - n_s / n_t:.0%} of the layers) would add the "
                      f"hidden-state loss, which a teacher cache cannot give (it holds logits "
                      f"only): training on the logit KL alone")
        return []
    kept = m.record["kept"]["layers"] if m.record else list(range(n_s))
    if len(kept) != n_s:
        raise common.UserError(f"{common.RECORD} lists {len(kept)} kept layers but STUDENT "
                               f"has {n_s}")
    n_source = m.record["source_shape"]["num_hidden_layers"] if m.record else n_t
    return hidden_pairs(kept, n_source, n_t, n_layers)


def build_distiller(student, teacher, m: Models, loss: LossSettings, pairs: list,
                    depth_cut: float) -> Distiller:
    """The Distiller of `student`: with the hidden-state map when `pairs` are trained (initialised
    from the kept hidden channels when the teacher is the model the student was pruned from)."""
    proj = torch.nn.Identity()
    if pairs:
        same_source = m.teacher == m.record.get("source_model")
        kept_hidden = m.record["kept"]["hidden"] if m.record and same_source else None
        proj = make_proj(m.s_conf.hidden_size, teacher.config.hidden_size, kept_hidden)
    n_s, n_t = m.s_conf.num_hidden_layers, m.t_layers
    common.print0(f"hidden_loss: {'on, (student, teacher) hidden states ' + str(pairs) if pairs else 'off'} "
                  f"(depth cut {1 - n_s / n_t:.0%}, threshold {depth_cut:.0%})")
    return Distiller(student, proj.to(student.device), pairs, loss)


def make_optimizer(model, lr: float, warmup: int, max_steps: int):
    """AdamW (beta2 _BETA2) and warmup then cosine decay from `lr` to _MIN_LR."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  betas=(0.9, _BETA2), weight_decay=_WEIGHT_DECAY)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, max_steps, min_lr_rate=_MIN_LR / lr if lr else 0.0)
    return optimizer, scheduler


# ---- data: held-out rows, the schedule, each step's batch ----------------------------------

@dataclasses.dataclass
class HeldOut:
    """EVAL_SAMPLES held-out rows, and how many rows and documents of DATASET they take away
    from training (none when _EVAL_DATASET gives them)."""
    rows: torch.Tensor
    skip_rows: int
    skip_documents: int


def held_out_rows(cfg, tokenizer, eval_dataset: str | None, seed: int) -> HeldOut:
    if not cfg.EVAL_SAMPLES:
        return HeldOut(torch.empty(0, cfg.SEQ_LEN, dtype=torch.long), 0, 0)
    position = {"documents": 0, "carry": []}
    rows = common.calibration_rows(eval_dataset or cfg.DATASET, tokenizer, cfg.EVAL_SAMPLES,
                                   cfg.SEQ_LEN, seed, position=position, model_knob="STUDENT")
    return HeldOut(rows, 0, 0) if eval_dataset else HeldOut(rows, len(rows), position["documents"])


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Sizes derived from the knobs: micro-batches per step, tokens per step, steps, warmup,
    where this run stops and whether it checkpoints there."""
    accum: int
    tokens_per_step: int
    max_steps: int
    stop: int
    warmup: int
    checkpoint_at_stop: bool = False


def schedule(cfg, world: int) -> Schedule:
    if cfg.GLOBAL_BATCH % (cfg.BATCH_SIZE * world):
        raise common.UserError(f"GLOBAL_BATCH={cfg.GLOBAL_BATCH} is not a multiple of BATCH_SIZE="
                               f"{cfg.BATCH_SIZE} x {world} processes")
    tokens = cfg.GLOBAL_BATCH * cfg.SEQ_LEN
    steps = cfg.MAX_STEPS or max(1, _TOTAL_TOKENS // tokens)
    return Schedule(accum=cfg.GLOBAL_BATCH // (cfg.BATCH_SIZE * world), tokens_per_step=tokens,
                    max_steps=steps, stop=min(steps, _STOP_AT_STEP or steps),
                    warmup=min(_WARMUP_STEPS, steps // 10))  # past a tenth of a run it wastes it


def local_batch(stream, global_batch: int, rank: int, world: int, stack: bool = True):
    """This process's share of the next global batch (every process reads it all): rows as one
    tensor, or (`stack` False) a list, e.g. of prompts of different lengths."""
    items = [next(stream) for _ in range(global_batch)]
    share = global_batch // world
    mine = items[rank * share:(rank + 1) * share]
    return torch.stack(mine) if stack else mine


class Batches:
    """This process's share of every step's batch: ("rows", packed rows of DATASET), or on an
    on-policy step ("sample", prompts); `position` and `prompt_position` are where the streams
    stand (saved with each checkpoint, a resumed run continues from them)."""

    def __init__(self, cfg, tokenizer, held: HeldOut, progress: dict | None, rank: int, world: int,
                 seed: int, prompt_share: float):
        self.global_batch, self.rank, self.world = cfg.GLOBAL_BATCH, rank, world
        self.share, self.seed = cfg.ON_POLICY, seed
        self.position = progress["data"] if progress else common.start_position()
        self.rows = common.row_stream(cfg.DATASET, tokenizer, cfg.SEQ_LEN, seed, held.skip_rows,
                                      self.position)  # keeps self.position up to date
        self.prompt_position, self.prompts, self.is_sampled_step = None, None, None
        if cfg.ON_POLICY > 0:
            import on_policy
            self.prompt_position = dict(progress["prompts"] if progress
                                        else on_policy.start(held.skip_documents))
            self.prompts = on_policy.prompt_stream(cfg.DATASET, tokenizer, cfg.SEQ_LEN, seed,
                                                   self.prompt_position, prompt_share, strict=False)
            self.is_sampled_step = on_policy.is_sampled_step

    def snapshot(self) -> dict:
        """Where the streams stand now, for a checkpoint (copies: reading goes on)."""
        return {"data": copy.deepcopy(self.position), "prompts": copy.deepcopy(self.prompt_position)}

    def next(self, step: int) -> tuple:
        """The batch of optimizer step `step` (1-based)."""
        if self.prompts is not None and self.is_sampled_step(step, self.share, self.seed):
            return "sample", local_batch(self.prompts, self.global_batch, self.rank, self.world,
                                         stack=False)
        return "rows", local_batch(self.rows, self.global_batch, self.rank, self.world)


# ---- one optimizer step, and what it works on -----------------------------------------------

@dataclasses.dataclass
class Run:
    """What the training of every student in one invocation shares."""
    acc: object               # accelerate's Accelerator: the processes
    device_type: str          # DEVICE resolved ('cuda' or 'cpu')
    dtype: torch.dtype        # the teacher's
    shard: bool               # FSDP
    schedule: Schedule
    held: HeldOut
    loss: LossSettings
    cache: object = None      # teacher_cache.TeacherCache (None: the live teacher)
    suite: dict = None        # benchmarks.py's downstream suite (None: none)

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def device(self) -> str:
        """Where this process computes ('cuda:0', 'cpu')."""
        return str(self.acc.device)


@dataclasses.dataclass
class Parts:
    """One student's training: its Distiller (`model`, wrapped for DDP or sharded; `inner`, the
    module itself), the teacher (None when a cache stands in), optimizer, LR schedule and the
    hidden-state pairs."""
    model: torch.nn.Module
    inner: Distiller
    teacher: object
    optimizer: object
    scheduler: object
    pairs: list


def train_step(parts: Parts, run: Run, rows: torch.Tensor, grad_clip: float,
               cached: dict | None = None, mask: torch.Tensor | None = None) -> dict:
    """One optimizer step's forward and backward over this process's `rows` in micro-batches
    (gradients clipped at `grad_clip`, not yet applied): the mean loss, KL, CE, hidden loss and
    gradient norm over all processes. `cached`: the rows' targets from a teacher cache (then no
    teacher runs); `mask`: the predictions that carry loss (on-policy rows; None: all)."""
    acc, dev, model, pairs = run.acc, run.device, parts.model, parts.pairs
    kl_on = parts.inner.loss.kl_weight > 0
    micro = rows.view(run.schedule.accum, -1, rows.shape[-1]).to(dev)
    masks = (mask.view(run.schedule.accum, -1, mask.shape[-1]).to(dev) if mask is not None
             else [None] * len(micro))
    weights = [1 / len(micro)] * len(micro)  # of each micro-batch's mean loss
    if mask is not None:  # sampled rows differ in length: every sampled token of the step weighs
        counts = masks.sum((1, 2)).double()  # the same, over micro-batches and processes
        n_all = acc.reduce(counts.sum(), "sum") if acc.num_processes > 1 else counts.sum()
        weights = (counts * acc.num_processes / n_all).tolist()
    total = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, kl, ce, hid
    for k, ids in enumerate(micro):
        target, t_states = None, {}
        if cached is not None and kl_on:
            part = slice(k * len(ids), (k + 1) * len(ids))
            target = ("topk", *(cached[n][part].flatten(0, 1).to(dev) for n in ("ids", "logp", "rest")))
        elif kl_on or pairs:
            at = [j for _, j in pairs]
            with torch.no_grad(), acc.autocast(), hidden_states(parts.teacher, at) as t_states:
                t_last = parts.teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            if kl_on:
                target = ("logits", t_last[:, :-1].flatten(0, 1), parts.teacher.lm_head.weight)
        # FSDP reduce-scatters every micro-batch's gradients: skipping that would keep whole
        # float32 gradients on every process until the last one
        last = k == len(micro) - 1
        sync = acc.no_sync(model) if not last and not run.shard else contextlib.nullcontext()
        with sync:
            loss, stats, hid, n_tok = model(ids, target, t_states, masks[k])
            acc.backward(loss * weights[k])
        total += torch.stack([loss.detach().double(), stats[0] / n_tok, stats[1] / n_tok,
                              hid.double()]) * weights[k]
    if run.shard:
        grad = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    else:
        grad = acc.clip_grad_norm_(model.parameters(), grad_clip)
    loss, kl, ce, hid = acc.reduce(total, "mean").tolist()
    return {"loss": loss, "kl": kl, "ce": ce, "hid": hid, "grad": float(grad)}


def check_loss(s: dict, step: int, ref_loss: float, root: Path, factor: float):
    """Stop on a NaN or a loss above `factor` x the first one (the checkpoints before it are
    kept)."""
    if not (math.isfinite(s["loss"]) and math.isfinite(s["grad"])):
        raise common.UserError(f"loss is {s['loss']}, gradient norm {s['grad']} at step {step}: "
                               f"training diverged; lower LR or check the data (checkpoints: {root})")
    if s["loss"] > factor * max(ref_loss, 1e-2):
        raise common.UserError(f"loss exploded at step {step}: {s['loss']:.4f} > "
                               f"{factor} x the first step's {ref_loss:.4f}; lower LR "
                               f"(checkpoints: {root})")


def held_out(parts: Parts, run: Run, batch_size: int, tokenizer) -> dict:
    """Held-out KL and perplexity of the student (every process under FSDP, else the first),
    against the live teacher or its cache, and its downstream accuracy (run.suite)."""
    rows = run.held.rows
    if not len(rows) and not run.suite:
        return {}
    cached = run.cache.held_out(rows) if run.cache is not None and len(rows) else None
    parts.inner.student.eval()
    with run.acc.autocast():
        m = parts.inner.held_out(rows.to(run.acc.device), batch_size, parts.teacher, cached,
                                 run.suite, tokenizer)
    parts.inner.student.train()
    return m


def eval_line(step: int, m: dict) -> str:
    """One held-out evaluation's line: KL, perplexity, downstream accuracy."""
    parts = [f"eval step {step:>6}"]
    if "kl" in m:
        parts += [f"kl {m['kl']:.4f}", f"ppl {m['student_ppl']:.3f}"]
    if "downstream" in m:
        parts.append(f"acc {m['accuracy']:.1f} (" + ", ".join(
            f"{k} {v:.1f}" for k, v in m["downstream"].items()) + ")")
    return " | ".join(parts)


# ---- the loop -------------------------------------------------------------------------------

@dataclasses.dataclass
class Tally:
    """Where one student's training stands (what a checkpoint carries: step, tokens, the first
    loss of each kind of step, the held-out metrics before training) and what this invocation
    measured (losses, the last held-out metrics, seconds and tokens of its steps)."""
    step: int = 0
    tokens: int = 0
    ref_loss: dict = dataclasses.field(default_factory=dict)
    start: dict = dataclasses.field(default_factory=dict)
    losses: list = dataclasses.field(default_factory=list)
    metrics: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    run_tokens: int = 0
    evals: list = dataclasses.field(default_factory=list)  # every evaluation: step, tokens, metrics


def evaluate_now(parts: Parts, run: Run, tally: Tally, batch_size: int, tokenizer) -> dict:
    """A held-out evaluation at the tally's step: logged (line, tracker) and kept in the tally's
    history (pare.json and the progress plot show it)."""
    m = held_out(parts, run, batch_size, tokenizer)
    if m:
        common.print0(eval_line(tally.step, m))
        keep = {k: m[k] for k in ("kl", "student_ppl", "accuracy", "downstream") if k in m}
        tally.evals.append({"step": tally.step, "tokens": tally.tokens, **keep})
        if _TRACKER:
            run.acc.log({f"eval/{k}": v for k, v in keep.items() if k != "downstream"}
                        | {f"eval/{k}": v for k, v in keep.get("downstream", {}).items()},
                        step=tally.step)
    return m


def begin(parts: Parts, run: Run, progress: dict | None, batch_size: int, tokenizer) -> Tally:
    """The tally of a resumed run, or of a new one with the held-out metrics before training
    (the first process only, unless FSDP needs all)."""
    if progress:  # a resumed run measures its held-out metrics again at its end
        return Tally(progress["step"], progress["tokens"], progress["ref_loss"], progress["start"],
                     evals=progress["evals"])
    tally = Tally()
    if common.is_first_process() or run.shard:
        tally.start = tally.metrics = evaluate_now(parts, run, tally, batch_size, tokenizer)
        if "teacher_ppl" in tally.start:
            common.print0(f"teacher: held-out ppl {tally.start['teacher_ppl']:.3f} on "
                          f"{tally.start['tokens']} tokens (reference)")
    return tally


def flops_per_token(parts: Parts, run: Run, seq_len: int) -> float:
    """Training FLOPs per token: the student's forward and backward (3x), and the teacher's
    forward when it runs; printed with the peak the MFU is measured against."""
    kl_on = parts.inner.loss.kl_weight > 0
    t_flops = (costs.forward_flops_per_token(parts.teacher.config, seq_len, lm_head=kl_on)
               if (kl_on or parts.pairs) and run.cache is None else 0)
    flops = 3 * costs.forward_flops_per_token(parts.inner.student.config, seq_len) + t_flops
    peak = costs.peak_tflops(run.device, _PEAK_TFLOPS)
    common.print0(f"flops: {flops / 1e9:.3f} GFLOP per token (student forward+backward 3x"
                  f"{', teacher forward 1x' if t_flops else ', no teacher forward'}); MFU against "
                  f"{f'{peak:g} TFLOP/s per device' if peak else 'no known peak (_PEAK_TFLOPS)'}")
    return flops


def one_step(parts: Parts, run: Run, batch: tuple, tally: Tally, sampler, root: Path,
             global_batch: int, t0: float) -> dict:
    """Optimizer step tally.step + 1 on `batch` (kind, rows or prompts), read since `t0`:
    sample (on-policy), forward and backward, check the loss, apply the update; the tally
    moves on."""
    kind, rows = batch
    mask = None
    if kind == "sample":  # the student continues the prompts; only its tokens carry loss
        rows, mask = sampler.sample(parts.inner.student, rows, run.acc)
    cached = (run.cache.train_rows(tally.step * global_batch + run.rank * len(rows), rows)
              if run.cache is not None else None)  # this process's rows of the global batch
    s = train_step(parts, run, rows, _GRAD_CLIP, cached, mask)
    tally.ref_loss.setdefault(kind, s["loss"])  # sampled rows' losses are on another scale
    check_loss(s, tally.step + 1, tally.ref_loss[kind], root, _ABORT_LOSS_FACTOR)
    s["lr"] = parts.scheduler.get_last_lr()[0]
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    s["seconds"], s["sampled"] = time.time() - t0, kind == "sample"
    tally.step, tally.tokens = tally.step + 1, tally.tokens + run.schedule.tokens_per_step
    tally.seconds += s["seconds"]
    tally.run_tokens += run.schedule.tokens_per_step
    tally.losses.append(s["loss"])
    return s


def log_line(step: int, run: Run, s: dict, pairs: list) -> str:
    """One step's line; `kl` is DIVERGENCE's value, `sampled` marks an on-policy step."""
    kl = f"{s['kl']:.4f}" if run.loss.kl_weight else "-"  # not computed
    hid = f"{s['hid']:.4f}" if pairs else "-"
    return (f"step {step:>6}/{run.schedule.max_steps} | loss {s['loss']:.4f} | kl {kl} | "
            f"ce {s['ce']:.4f} | hid {hid} | lr {s['lr']:.2e} | grad {s['grad']:.3f} | "
            f"{run.schedule.tokens_per_step / s['seconds']:,.0f} tok/s | "
            f"{s['seconds']:.2f}s{' | sampled' if s['sampled'] else ''}")


def progress_of(tally: Tally, run: Run, positions: dict, settings: dict, m: Models,
                scheduler) -> dict:
    """What a checkpoint's progress.json holds (checkpoints.PROGRESS_KEYS); `positions`: where
    the data streams stood after the step (Batches.snapshot)."""
    return dict(step=tally.step, tokens=tally.tokens, world=run.world, fsdp=run.shard,
                **positions, ref_loss=tally.ref_loss, start=tally.start, evals=tally.evals,
                settings=settings,
                student=m.student_id, teacher=m.teacher_id, scheduler=scheduler.state_dict())


def run_summary(tally: Tally, run: Run, flops_token: float, sampler) -> dict:
    """The numbers a run reports (print_summary) and records (pare.json)."""
    tok_s = tally.run_tokens / tally.seconds if tally.run_tokens else 0.0
    tflops = tok_s * flops_token / run.world / 1e12  # per device
    peak = costs.peak_tflops(run.device, _PEAK_TFLOPS)
    return {"steps": tally.step, "max_steps": run.schedule.max_steps, "tokens": tally.tokens,
            "losses": tally.losses, "start": tally.start, "final": tally.metrics,
            "tokens_per_s": tok_s, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None, "peak_memory_gib": costs.peak_memory_gib(run.device)[0],
            "sampling": sampler.summary(tally.seconds, run.acc) if sampler else None,
            "evals": tally.evals,
            "finished": tally.step >= run.schedule.max_steps, "output": None}


def run_settings(cfg) -> dict:
    """What a checkpoint records of how it was made and a resume compares: the knobs, the recipe
    and the content of local data files (an edited DATASET would silently change the rows); of
    TEACHER_CACHE only whether there is one (a moved cache still resumes: teacher_cache.py
    checks its manifest against the run)."""
    return {**vars(cfg), **common.recipe(globals()),
            "TEACHER_CACHE": cfg.TEACHER_CACHE is not None,  # a cache is known by its manifest
            "data_fingerprint": common.data_fingerprint(cfg.DATASET),
            "eval_data_fingerprint": common.data_fingerprint(_EVAL_DATASET or "")}


def train(cfg, m: Models, run: Run, parts: Parts, batches: Batches, first: tuple | None,
          progress: dict | None, root: Path) -> dict:
    """The training loop from the checkpoint `progress` (None: the start) to the schedule's
    stop: steps, log lines, held-out evaluations, checkpoints, and a checkpoint then a stop
    after the step in which Ctrl-C or SIGTERM came (see common.stop_requests). `first`: the
    first step's batch, read before the models loaded (so that data errors come first).
    Returns the run summary."""
    sched, settings = run.schedule, run_settings(cfg)
    evaluating = common.is_first_process() or run.shard  # under FSDP every process takes part
    tally = begin(parts, run, progress, cfg.BATCH_SIZE, m.tokenizer)
    flops = flops_per_token(parts, run, cfg.SEQ_LEN)
    sampler = None
    if cfg.ON_POLICY > 0:
        import on_policy
        sampler = on_policy.Sampler.of(m.s_conf, m.tokenizer, cfg.SEQ_LEN, _GEN_TEMPERATURE)
    bar = tqdm(total=sched.stop, initial=tally.step, desc="distill",
               disable=not common.is_first_process())
    while tally.step < sched.stop:
        t0, positions = time.time(), batches.snapshot()
        try:
            batch = first if first is not None else batches.next(tally.step + 1)
        except common.UserError as e:  # a bad record deep in a streamed dataset: keep the steps
            path = checkpoints.save(root, progress_of(tally, run, positions, settings, m,
                                                      parts.scheduler),
                                    parts.model, parts.optimizer, run.acc, run.shard,
                                    _KEEP_CHECKPOINTS)
            raise common.UserError(f"{e} (read for step {tally.step + 1}; checkpoint {path})") from None
        first = None
        s = one_step(parts, run, batch, tally, sampler, root, cfg.GLOBAL_BATCH, t0)
        step = tally.step
        bar.update(1)
        if step % _LOG_EVERY == 0 or step == sched.stop:
            common.print0(log_line(step, run, s, parts.pairs))
            if _TRACKER:
                run.acc.log({f"train/{k}": s[k] for k in ("loss", "kl", "ce", "hid", "lr", "grad")},
                            step=step)
        if (step % _EVAL_EVERY == 0 or step == sched.stop) and evaluating:
            tally.metrics = evaluate_now(parts, run, tally, cfg.BATCH_SIZE, m.tokenizer)
        stop = common.stop_requested() and step < sched.max_steps
        if run.world > 1:  # every process stops at the same step
            stop = bool(run.acc.reduce(torch.tensor(float(stop), device=run.device), "sum").item())
        if stop or (_CHECKPOINT_EVERY and step % _CHECKPOINT_EVERY == 0) or (
                step == sched.stop and sched.checkpoint_at_stop):
            path = checkpoints.save(root, progress_of(tally, run, batches.snapshot(), settings, m,
                                                      parts.scheduler),
                                    parts.model, parts.optimizer, run.acc, run.shard,
                                    _KEEP_CHECKPOINTS)
        if stop:
            bar.close()
            raise common.Interrupted(f"stopped after step {step}: checkpoint {path}; run the "
                                     f"same command again to resume")
    bar.close()
    if not tally.metrics and evaluating:  # resumed at the last step: nothing ran
        tally.metrics = evaluate_now(parts, run, tally, cfg.BATCH_SIZE, m.tokenizer)
    return run_summary(tally, run, flops, sampler)


# ---- one student's run ----------------------------------------------------------------------

def resume_point(cfg, m: Models, root: Path, run: Run) -> tuple:
    """(the latest checkpoint under `root`, its progress), checked to continue this run; (None,
    None) at the start."""
    return checkpoints.latest(root, run_settings(cfg), RESUMABLE, m.ids(), run.shard, run.world)


def build(cfg, m: Models, run: Run, teacher=None) -> Parts:
    """Load the student (and the teacher, unless given or a cache stands in), build the
    Distiller, shard it or wrap it for DDP, and make its optimizer and LR schedule."""
    student, teacher = load_pair(cfg, m, run.dtype, run.device, run.shard, run.rank, teacher,
                                 run.cache is not None)
    pairs = hidden_loss_pairs(m, teacher, _HIDDEN_LOSS_LAYERS, _HIDDEN_LOSS_DEPTH_CUT)
    model = build_distiller(student, teacher, m, run.loss, pairs, _HIDDEN_LOSS_DEPTH_CUT)
    if run.shard:
        import sharding
        sharding.shard(model, teacher, run.device, run.world, run.rank, run.device_type.startswith("cuda"))
    optimizer, scheduler = make_optimizer(model, cfg.LR, run.schedule.warmup, run.schedule.max_steps)
    if cfg.ON_POLICY > 0 and run.rank > 0:  # each process samples with its own random numbers (a
        torch.manual_seed(_SEED + run.rank)  # resumed run restores its saved state instead)
    if not run.shard:
        model, optimizer = run.acc.prepare(model, optimizer)
    inner = model if run.shard else run.acc.unwrap_model(model)
    return Parts(model, inner, teacher, optimizer, scheduler, pairs)


def restore(parts: Parts, run: Run, saved: Path, progress: dict):
    """Weights, optimizer, LR schedule and RNG of checkpoint `saved`."""
    if run.shard:
        checkpoints.load_sharded(saved, parts.model, parts.optimizer, run.rank)
    else:
        checkpoints.load_state(saved, parts.inner, parts.optimizer, run.rank, run.device)
    parts.scheduler.load_state_dict(progress["scheduler"])
    common.print0(f"resume: {saved} (step {progress['step']}, {progress['tokens']} tokens seen)")


def plot_progress(path: Path, evals: list, title: str):
    """Held-out KL and downstream accuracy against tokens seen, as a PNG beside the output."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tokens = [e["tokens"] / 1e6 for e in evals]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if all("kl" in e for e in evals):
        ax.plot(tokens, [e["kl"] for e in evals], "o-", color="tab:blue", label="held-out KL")
        ax.set_ylabel("KL(teacher || student), nats/token")
    if all("accuracy" in e for e in evals):
        acc = ax.twinx()
        acc.plot(tokens, [e["accuracy"] for e in evals], "s--", color="tab:red",
                 label="downstream accuracy")
        acc.set_ylabel("mean accuracy, %")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_title(f"distilling {Path(title).name}", fontsize=9)
    fig.tight_layout()
    common.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_output(cfg, m: Models, run: Run, parts: Parts, summary: dict, out_dir: Path):
    """The final HF directory (first process), its pare.json extending the student's."""
    if run.shard:
        import sharding
        student = sharding.full_student(parts.model, cfg.STUDENT)
    else:
        student = parts.inner.student if common.is_first_process() else None
    if student is None:
        return
    record = dict(m.record) if m.record else {"source_model": m.teacher}
    shape = common.shape_of(m.s_conf)
    record.update(stage="distill", versions=common.versions(), lineage=common.lineage(
        m.student, shape, m.student_id, "STUDENT"), distill={
        "config": vars(cfg), "recipe": common.recipe(globals()), "student": m.student,
        "student_fingerprint": m.student_id, "teacher": m.teacher,
        "teacher_fingerprint": m.teacher_id, "steps": summary["steps"],
        "tokens_seen": summary["tokens"], "processes": run.world, "fsdp": run.shard,
        "throughput": {k: summary[k] for k in ("tokens_per_s", "tflops_per_device", "mfu",
                                               "peak_memory_gib", "sampling")},
        "hidden_loss_pairs": parts.pairs,
        "metrics": {"start": summary["start"], "final": summary["final"]},
        "evals": summary["evals"],  # every held-out evaluation: step, tokens, KL, accuracy
        "teacher_cache": run.cache.summary() if run.cache is not None else None,
        "created": common.now()})
    common.write_checkpoint(student, cfg.STUDENT, out_dir, record,
                            dtype=common.stored_dtype(m.s_conf))
    if summary["evals"]:
        plot_progress(out_dir / "progress.png", summary["evals"], m.student)


def distill_one(cfg, m: Models, run: Run, root: Path, out_dir: Path, stop: int, teacher=None,
                always_write: bool = False) -> dict:
    """One student's run from its latest checkpoint under `root` (none: the start) to step
    `stop`: check it may resume, read its first batch, load (the teacher too, unless given),
    build, train, and write `out_dir` when the schedule is done (or `always_write`). Returns
    the run summary."""
    run = dataclasses.replace(run, schedule=dataclasses.replace(
        run.schedule, stop=stop, checkpoint_at_stop=always_write or stop < run.schedule.max_steps))
    saved, progress = resume_point(cfg, m, root, run)
    batches = Batches(cfg, m.tokenizer, run.held, progress, run.rank, run.world, _SEED,
                      _PROMPT_SHARE)
    step = progress["step"] if progress else 0
    first = batches.next(step + 1) if step < stop else None  # data errors before any load
    if teacher is None:
        costs.print_memory(m.s_conf, None if run.cache else m.t_conf, run.dtype,
                     run.world if run.shard else 1, run.device_type)
    from accelerate.utils import set_seed
    set_seed(_SEED)
    t0 = time.time()
    parts = build(cfg, m, run, teacher)
    if progress:
        restore(parts, run, saved, progress)
    common.print0(f"models: student {cfg.STUDENT} {m.s_conf.architectures} "
                  f"{m.s_conf.num_hidden_layers} layers, teacher {m.teacher} {m.t_layers} layers"
                  f"{' (from its cache)' if run.cache else ''}, on {run.device} ({run.world} "
                  f"process{'es' if run.world > 1 else ''}), loaded in {time.time() - t0:.1f}s")
    sched = run.schedule
    common.print0(f"batch: {cfg.GLOBAL_BATCH} rows x {cfg.SEQ_LEN} tokens = "
                  f"{sched.tokens_per_step} tokens/step = {run.world} processes x {sched.accum} "
                  f"micro-batches x {cfg.BATCH_SIZE} rows; {sched.max_steps} steps = "
                  f"{sched.max_steps * sched.tokens_per_step / 1e6:.2f}M tokens")
    # a signal from here on stops after a step with a checkpoint, never inside the output's write
    with common.stop_requests("stopping after this step with a checkpoint"):
        summary = train(cfg, m, run, parts, batches, first, progress, root)
        if summary["finished"] or always_write:
            write_output(cfg, m, run, parts, summary, out_dir)
            summary["output"] = str(out_dir)
        if summary["finished"] and not always_write:  # the output is complete: a rerun
            run.acc.wait_for_everyone()                # starts afresh, not from these
            checkpoints.clear(root)
    run.acc.free_memory()  # the accelerator forgets this student and its optimizer
    return summary


# ---- the options around it: a teacher cache, a selection between students -------------------

def open_teacher_cache(cfg, m: Models, run: Run, n_rows: int):
    """teacher_cache.py's cache of this run's first `n_rows` training rows and its held-out
    rows, filled first where it lacks them (the teacher loaded only then)."""
    import teacher_cache
    path = Path(cfg.TEACHER_CACHE).expanduser()
    manifest = teacher_cache.read_manifest(path) or teacher_cache.create(path, teacher_cache.new_manifest(
        m.teacher, m.teacher_id, m.t_layers, m.tokenizer, m.t_conf.vocab_size,
        cache_data(cfg, _EVAL_DATASET, _SEED),
        cfg.TOPK, _CACHE_DTYPE, _CACHE_SHARD_ROWS))

    def rows():
        return common.row_stream(cfg.DATASET, m.tokenizer, cfg.SEQ_LEN, _SEED, run.held.skip_rows,
                                 common.start_position())

    def teacher(name: str):
        return load_teacher(name, run.device, run.dtype)
    return teacher_cache.prepare(path, manifest, n_rows, rows, run.held.rows, cfg.SEQ_LEN,
                                 cfg.BATCH_SIZE, _CHUNK_TOKENS, run.acc, teacher)


def select_then_distill(cfg, runs: list, models: list, run: Run, plan, root: Path,
                        out_dir: Path) -> dict:
    """selection.py's funnel between several students, each round's candidates trained by
    `distill_one` next to one teacher loaded once, then the winner's run."""
    import selection
    costs.print_memory(models[0].s_conf, None if run.cache else models[0].t_conf, run.dtype, 1,
                       run.device_type)
    teacher = None if run.cache else load_teacher(models[0].teacher, run.device, run.dtype)

    def train_candidate(knobs, m: Models, ckpt_root: Path, out: Path, stop: int,
                        always_write: bool):
        return distill_one(knobs, m, run, ckpt_root, out, stop, teacher, always_write)
    return selection.select(cfg, runs, models, plan, run, root, out_dir, train_candidate)


# ---- the stage ------------------------------------------------------------------------------

def check_recipe():
    """The recipe constants above are in range (an edit here, not user input)."""
    assert _TEMPERATURE > 0 and _CHUNK_TOKENS >= 1 and _KEEP_CHECKPOINTS >= 1
    assert _STOP_AT_STEP is None or _STOP_AT_STEP >= 1
    assert 0 < _JSD_BETA < 1 and _GEN_TEMPERATURE > 0 and 0 < _PROMPT_SHARE < 1
    assert _CACHE_DTYPE in ("float16", "bfloat16", "float32") and _CACHE_SHARD_ROWS >= 1
    assert 0 < _SELECT_KEEP < 1 and _SELECT_GROWTH >= 1


def check_knobs(cfg):
    """Cheap checks on the knobs, and on the recipe constants they meet."""
    check_recipe()
    common.at_least(cfg, 1, "BATCH_SIZE", "GLOBAL_BATCH")
    common.at_least(cfg, 0, "EVAL_SAMPLES")
    common.at_least(cfg, 2, "SEQ_LEN")  # one next-token prediction per row at least
    if cfg.LR < 0 or _MIN_LR > cfg.LR:
        raise common.UserError(f"LR={cfg.LR} must be positive and at least _MIN_LR={_MIN_LR}")
    if cfg.MAX_STEPS is not None and cfg.MAX_STEPS < 1:
        raise common.UserError(f"MAX_STEPS must be a positive integer or None, got {cfg.MAX_STEPS}")
    if _KL_WEIGHT == 0 and _CE_WEIGHT == 0:
        raise common.UserError("_KL_WEIGHT and _CE_WEIGHT are both 0 in distill.py: nothing to train")
    if not 0 <= cfg.ON_POLICY <= 1:
        raise common.UserError(f"ON_POLICY={cfg.ON_POLICY} is the share of on-policy steps: "
                               f"between 0 and 1")
    if cfg.DIVERGENCE not in DIVERGENCES:
        raise common.UserError(f"DIVERGENCE={cfg.DIVERGENCE!r} must be one of {list(DIVERGENCES)}")
    if cfg.ON_POLICY > 0:
        import on_policy
        on_policy.check_knobs(cfg.FSDP, cfg.TEACHER_CACHE, _KL_WEIGHT)
    if cfg.TEACHER_CACHE is not None:
        import teacher_cache
        teacher_cache.check_knobs(cfg.TOPK, cfg.DIVERGENCE, _TEMPERATURE)


def check_outputs(cfg, runs: list, models: list) -> tuple:
    """(OUTPUT, its checkpoint directory, its selection directory or None), each safe to write:
    never an input (TEACHER_CACHE is read and written: never an input, never inside an output)."""
    inputs = {"TEACHER": models[0].teacher, "DATASET": cfg.DATASET, "_EVAL_DATASET": _EVAL_DATASET,
              **{f"STUDENT {c.STUDENT!r}": c.STUDENT for c in runs}}
    if cfg.TEACHER_CACHE:
        common.check_output(cfg.TEACHER_CACHE, "TEACHER_CACHE", inputs,
                            lambda p: common.is_record_of(p, "teacher-cache"), may_read_only=True)
        inputs["TEACHER_CACHE"] = cfg.TEACHER_CACHE
    out_dir = common.check_output(cfg.OUTPUT, "OUTPUT", inputs,
                                  lambda p: common.is_record_of(p, "distill"))
    root = common.check_output(f"{cfg.OUTPUT.rstrip('/')}-checkpoints", "OUTPUT's checkpoint "
                               "directory", inputs, checkpoints.is_root)
    select_dir = None
    if len(runs) > 1:
        import selection
        select_dir = common.check_output(selection.root(cfg.OUTPUT), "OUTPUT's selection directory",
                                         inputs, lambda p: common.is_record_of(p, "distill-select"))
    return out_dir, root, select_dir


def start_processes(cfg, device: str, tracker):
    """The Accelerator of this run's processes (logging to `tracker`, _TRACKER, when set)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    if isinstance(tracker, str):
        import importlib.util
        if importlib.util.find_spec(tracker) is None:
            raise common.UserError(f"_TRACKER={tracker!r} in distill.py needs the `{tracker}` "
                                   f"package: `uv pip install {tracker}`, or set _TRACKER = None")
    acc = Accelerator(cpu=device == "cpu", log_with=tracker,
                      project_dir=str(Path(cfg.OUTPUT).parent) if tracker else None,
                      mixed_precision="bf16" if device.startswith("cuda") else "no")
    if tracker:
        acc.init_trackers("pare-distill", config={k: v for k, v in vars(cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})
    if acc.distributed_type == DistributedType.FSDP:
        raise common.UserError("distill.py shards with FSDP=True (FSDP2, tested), not with "
                               "accelerate's FSDP plugin: launch without --use_fsdp and set "
                               "FSDP=True")
    if cfg.FSDP and acc.num_processes < 2:
        raise common.UserError("FSDP=True shards the models over several processes; start them "
                               "with `accelerate launch --num_processes N distill.py FSDP=True`")
    return acc


def warn_small_run_traps(cfg, sched: Schedule, device: str):
    """Settings that run but are almost certainly not what was meant."""
    if sched.warmup < _WARMUP_STEPS:
        common.print0(f"schedule: warmup {sched.warmup} steps (_WARMUP_STEPS={_WARMUP_STEPS} "
                      f"capped at a tenth of the {sched.max_steps} steps)")
    if device == "cpu" and sched.tokens_per_step > 64 * 1024:
        common.print0(f"warning: {sched.tokens_per_step:,} tokens per optimizer step "
                      f"(GLOBAL_BATCH={cfg.GLOBAL_BATCH} x SEQ_LEN={cfg.SEQ_LEN}) on a CPU: at a "
                      f"few hundred tokens/s each step takes hours; for a trial run lower both")


def print_summary(s: dict, mem_kind: str):
    """The run's `key: value` summary."""
    lines = [("steps", f"{s['steps']}/{s['max_steps']}"), ("tokens", s["tokens"]),
             ("tokens_per_s", f"{s['tokens_per_s']:.1f}"),  # training steps, all processes
             ("tflops_per_device", f"{s['tflops_per_device']:.4g}"),
             ("mfu", s["mfu"] is not None and f"{s['mfu']:.3f}"),
             ("peak_memory_gib", f"{s['peak_memory_gib']:.2f} ({mem_kind}, first process)")]
    if s.get("sampling"):
        lines += [("sampled_steps", s["sampling"]["steps"]),
                  ("sampled_tokens_per_s", f"{s['sampling']['tokens_per_s']:.1f}"),
                  ("sampling_share", f"{s['sampling']['share_of_step_time']:.3f}")]
    if s["losses"]:
        lines += [("loss_first", f"{s['losses'][0]:.4f}"), ("loss_last", f"{s['losses'][-1]:.4f}")]
    for name in ("start", "final"):
        if "kl" in s[name]:
            lines += [(f"{name}_kl", f"{s[name]['kl']:.4f}"),
                      (f"{name}_ppl", f"{s[name]['student_ppl']:.3f}")]
        if "accuracy" in s[name]:
            lines.append((f"{name}_accuracy", f"{s[name]['accuracy']:.2f}"))
    if "teacher_ppl" in s["start"]:
        lines.append(("teacher_ppl", f"{s['start']['teacher_ppl']:.3f}"))
    lines.append(("output", s["output"] or "none (stopped early; rerun to resume)"))
    for key, value in lines:
        if value is not False:
            common.print0(f"{key}: {value}")


def main(argv: list[str]) -> dict:
    cfg = common.configure(globals(), argv)
    check_knobs(cfg)
    runs = [cfg]
    if isinstance(cfg.STUDENT, list):  # several: a selection between them, then the winner
        import selection
        runs = selection.candidates(cfg)
    models = [resolve_models(c) for c in runs]
    if len(runs) > 1:
        selection.check_teachers(runs, models)
    out_dir, root, select_dir = check_outputs(cfg, runs, models)
    device = common.pick_device(cfg.DEVICE)
    acc = start_processes(cfg, device, _TRACKER)
    sched = schedule(cfg, acc.num_processes)
    plan = None
    if select_dir:
        funnel = selection.Funnel(_SELECT_KEEP, _SELECT_GROWTH, _SELECT_FLAT)
        ends = selection.plan_rounds(len(runs), cfg.SELECT_TOKENS, cfg.EVAL_SAMPLES,
                                     sched.tokens_per_step, sched.max_steps, _STOP_AT_STEP,
                                     cfg.FSDP, funnel)
        plan = selection.Plan(ends, funnel, select_dir, selection.settings(
            vars(cfg), common.recipe(globals()), RESUMABLE, models, ends))
    warn_small_run_traps(cfg, sched, device)
    for m in models:  # sampling (ON_POLICY) needs the room as much as training
        common.check_positions(m.s_conf, cfg.SEQ_LEN, "STUDENT")
        if m.t_conf is not None:
            common.check_positions(m.t_conf, cfg.SEQ_LEN, "the teacher")
    held = held_out_rows(cfg, models[0].tokenizer, _EVAL_DATASET, _SEED)  # before any model loads
    run = Run(acc, device, common.pick_dtype(_DTYPE, device), cfg.FSDP, sched, held,
              LossSettings(_TEMPERATURE, _KL_WEIGHT, _CE_WEIGHT, _CHUNK_TOKENS, cfg.DIVERGENCE,
                           _JSD_BETA))
    if _EVAL_TASKS:  # the downstream suite, read (and checked) before any model loads
        import benchmarks
        run.suite = benchmarks.suite_of(_EVAL_TASKS, _EVAL_TASK_DOCS)
    if cfg.ON_POLICY > 0:  # sampling settings and the first step's prompts, before any load
        import on_policy
        for m in models:
            on_policy.check_inputs(cfg.DATASET, m.s_conf, m.tokenizer, cfg.SEQ_LEN, _SEED,
                                   on_policy.start(held.skip_documents), cfg.GLOBAL_BATCH,
                                   _PROMPT_SHARE)
    if plan is not None:  # a selection that could not continue is refused before any load
        selection.read_record(plan.select_dir, plan.settings)
    if cfg.TEACHER_CACHE:  # the rows of the whole run (the winner's too when selecting)
        if plan is None:  # a run that could not resume is refused before the fill
            resume_point(cfg, models[0], root, run)
        last = plan.ends[-1] if plan and cfg.MAX_STEPS is None else sched.stop
        run.cache = open_teacher_cache(cfg, models[0], run, last * cfg.GLOBAL_BATCH)
    if plan is None:
        summary = distill_one(cfg, models[0], run, root, out_dir, sched.stop)
    else:
        summary = select_then_distill(cfg, runs, models, run, plan, root, out_dir)
    acc.wait_for_everyone()
    if _TRACKER:
        acc.end_training()
    if run.cache is not None:
        summary["cache_filled"] = run.cache.filled
    print_summary(summary, costs.peak_memory_gib(device)[1])
    return summary


if __name__ == "__main__":
    common.run(main)
