"""Stage 3 of Pare: recover a pruned student by distilling the teacher's logits (Minitron).

    uv run distill.py                                       # out/pruned -> out/distilled
    uv run distill.py STUDENT=out/pruned DATASET=notes.txt SEQ_LEN=256 MAX_STEPS=100
    uv run accelerate launch --num_processes 8 distill.py    # several GPUs (DDP), same constants
    uv run accelerate launch --num_processes 8 distill.py FSDP=True   # models too big for one GPU
    uv run accelerate launch --multi_gpu --num_processes 2 distill.py DEVICE=cpu   # 2 CPU processes

Any constant below can be overridden for one run as NAME=value (a Python literal, else a
string). The run reads STUDENT (the directory prune.py wrote; its `pare.json` names the source
model, which is the teacher unless TEACHER is set) and DATASET (hub dataset with a `messages`
or `text` column, or a local .txt / .jsonl / .parquet file, packed to SEQ_LEN exactly as
importance_analysis.py packs it). The teacher must share the student's tokenizer (vocabulary and
special tokens); anything else is an error before training.

Loss (Minitron P1 Tables 15-16: logits-only KLD beat every mix with CE): forward
KL(teacher || student) per token at TEMPERATURE (scaled by T^2), the mean over all tokens of the
global batch, plus CE_WEIGHT x next-token cross-entropy (0 by default). Logits exist only
CHUNK_TOKENS tokens at a time, for both models, also during backward: the chunked loss computes
its gradient as it goes (the student's logits are used once and freed), so memory does not grow
with batch x sequence x vocabulary. When the student kept fewer than (1 - HIDDEN_LOSS_DEPTH_CUT)
of the teacher's layers, a cosine loss between student and teacher hidden states (embedding
output and HIDDEN_LOSS_LAYERS mapped layers, through one shared trainable linear map when the
hidden sizes differ) is added, rescaled every step to the logit loss's magnitude.

Optimisation: AdamW (beta2 0.95), linear warmup then cosine decay from LR to MIN_LR, gradient
clipping, accumulation to GLOBAL_BATCH rows per step over all processes, bf16 autocast on GPU
(master weights float32), optional activation checkpointing. Training stops with an error on a
NaN or an exploding loss.

Processes: GLOBAL_BATCH is split over the processes, each reading the same packed stream and
taking its share; gradients are averaged over processes, so N processes follow the one-process
loss trajectory within float tolerance. By default (DDP) every process holds the whole student
and teacher. FSDP=True (or `accelerate launch --use_fsdp`) shards both over the processes with
PyTorch FSDP2 (`fully_shard`, one group per decoder layer, bf16 compute with float32 master
weights and gradient reduction on GPU): a process holds 1/N of each model's weights, the
student's optimizer state and gradients, plus the layer being computed (gradients are
reduce-scattered after every micro-batch, so none is ever held whole). The teacher's output
layer is kept whole on every process (the chunked loss reads it directly). Only the first
process reads the checkpoints, into CPU memory; the others build empty models and receive their
shards from it. Before loading, the run prints what weights, gradients and optimizer state need
per process (student: float32 AdamW, 16 bytes per parameter) and warns when that exceeds 90% of
the GPU.

Held-out: EVAL_SAMPLES rows (the first rows of DATASET, never trained on, or EVAL_DATASET) give
KL(teacher || student) and student perplexity every EVAL_EVERY steps; the teacher's perplexity
is printed once. Every LOG_EVERY steps one fixed-format line: loss, KL, CE, hidden loss, learning
rate, gradient norm, tokens/s. At the end: tokens/s of the training steps, TFLOP/s per device
(PaLM count: 3x the student's forward FLOPs plus 1x the teacher's), MFU when the device's peak is
known (PEAK_TFLOPS), and peak memory.

Checkpoints: every CHECKPOINT_EVERY steps to CHECKPOINT_DIR/step-NNNNNNN (model, optimizer,
scheduler, data position, RNG; with FSDP as a torch.distributed.checkpoint directory that
another number of processes can load, FSDP again), written atomically, the last
KEEP_CHECKPOINTS kept. Running the same command again resumes from the latest one and continues
with the same losses (bit-identical on CPU). The data position is saved as documents read plus
the tokens carried into the next row, so resuming re-tokenizes nothing (the documents before
that point are skipped: a local file by index, a hub stream read forward). STOP_AT_STEP ends a
run early with a checkpoint (for time-limited jobs).

Writes OUTPUT: an HF directory (weights in the student's stored dtype, tokenizer, chat template,
generation config, explicit head_dim and layer_types) with prune.py's `pare.json` record
extended by a "distill" entry (settings, steps, tokens seen, start and final metrics).
"""

import contextlib
import io
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common

# ---- models ---------------------------------------------------------------------------------
STUDENT = "out/pruned"                 # directory prune.py wrote (its default OUTPUT)
TEACHER = None                         # hub id or directory; None: the source in STUDENT's pare.json
TRUST_REMOTE_CODE = False              # let transformers run code shipped with the models
DTYPE = None                           # teacher dtype; None: bfloat16 on GPU, float32 on CPU
DEVICE = None                          # 'cuda', 'cpu', ...; None: cuda when available
FSDP = False                           # shard student and teacher over the processes (FSDP2)
# ---- data -----------------------------------------------------------------------------------
DATASET = "allenai/Dolci-Instruct-SFT" # hub dataset (messages/text column) or local .txt/.jsonl/.parquet
EVAL_DATASET = None                    # held-out data; None: the first EVAL_SAMPLES rows of DATASET
EVAL_SAMPLES = 32                      # held-out rows; 0 disables evaluation
SEQ_LEN = 4096                         # tokens per packed row
BATCH_SIZE = 4                         # rows per forward/backward (micro-batch) on each process
GLOBAL_BATCH = 256                     # rows per optimizer step, all processes and accumulation
SEED = 0                               # data shuffling and the hidden-state map's init
# ---- loss -----------------------------------------------------------------------------------
TEMPERATURE = 1.0                      # softmax temperature of the KL term (Minitron: 1)
KL_WEIGHT = 1.0                        # weight of KL(teacher || student); 0 with CE_WEIGHT=1: plain CE
CE_WEIGHT = 0.0                        # weight of next-token cross-entropy (Minitron: none)
CHUNK_TOKENS = 1024                    # tokens whose full-vocabulary logits exist at once
HIDDEN_LOSS_DEPTH_CUT = 0.3            # add hidden-state losses when this share of layers was cut
HIDDEN_LOSS_LAYERS = 4                 # student layers mapped to teacher layers (plus embeddings)
# ---- optimisation ---------------------------------------------------------------------------
LR = 1e-4                              # peak learning rate (Minitron: 1e-4)
MIN_LR = 1e-5                          # floor of the cosine decay (Minitron: 1e-5)
WARMUP_STEPS = 50                      # linear warmup steps (Minitron: 40-100)
TOTAL_TOKENS = 2_500_000_000           # schedule length in tokens (Minitron: most recovery by 2.5B)
MAX_STEPS = None                       # optimizer steps; None: TOTAL_TOKENS / tokens per step
BETA2 = 0.95                           # AdamW second-moment decay (Minitron)
WEIGHT_DECAY = 0.0                     # AdamW decoupled weight decay (none: stay near the teacher)
GRAD_CLIP = 1.0                        # max global gradient norm (Minitron: 1.0)
GRADIENT_CHECKPOINTING = False         # recompute the student's activations in backward (saves memory)
ABORT_LOSS_FACTOR = 10.0               # abort when the loss exceeds this x the run's first loss
# ---- logging, checkpoints, output -----------------------------------------------------------
LOG_EVERY = 1                          # steps between log lines
PEAK_TFLOPS = None                     # device's dense bf16 peak for MFU; None: known GPUs only
EVAL_EVERY = 200                       # steps between held-out evaluations (and at start and end)
CHECKPOINT_EVERY = 500                 # steps between checkpoints; 0: none
KEEP_CHECKPOINTS = 2                   # most recent checkpoints kept
CHECKPOINT_DIR = None                  # None: OUTPUT + '-checkpoints'
STOP_AT_STEP = None                    # stop after this step with a checkpoint; None: run to the end
OUTPUT = "out/distilled"               # final HF directory

# Constants that may change between a run and its resumption (they do not affect the losses).
_RESUMABLE = {"LOG_EVERY", "EVAL_EVERY", "CHECKPOINT_EVERY", "KEEP_CHECKPOINTS", "STOP_AT_STEP",
              "OUTPUT", "CHECKPOINT_DIR", "DEVICE", "FSDP"}  # FSDP: checked as the checkpoint's format


# ---- the loss -------------------------------------------------------------------------------

class ChunkedDistillLoss(torch.autograd.Function):
    """Logit loss of N tokens with full-vocabulary logits for only `chunk` tokens at a time.

    loss = (kl_w * T^2 * sum KL(softmax(z_t/T) || softmax(z_s/T)) + ce_w * sum CE(z_s, y)) / N
    with z = h @ W^T. The gradient w.r.t. the student's logits is known in closed form
    (kl_w * T * (p_s - p_t) + ce_w * (softmax(z_s) - onehot(y))) / N, so each chunk's
    gradients w.r.t. h_s and W_s are computed in forward and the chunk's logits freed; backward
    only scales them. Also returns (non-differentiable) summed KL and CE for logging.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, temperature, kl_w, ce_w, chunk):
        n = h_s.shape[0]
        wide = torch.promote_types(h_s.dtype, torch.float32)  # logits: float32 (float64 in tests)
        w_sc = w_s.to(h_s.dtype)
        w_tc = w_t.to(h_t.dtype) if h_t is not None else None
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
            if kl_w:                                      # grad: p_s - p_t at temperature T
                ls = ls1 if temperature == 1 else (z_s / temperature).log_softmax(-1)
                z_t = (h_t[i:i + chunk] @ w_tc.T).to(wide)
                lt = (z_t if temperature == 1 else z_t / temperature).log_softmax(-1)
                del z_t
                pt = lt.exp()
                kl_sum += torch.dot(pt.flatten(), lt.sub_(ls).flatten()).double()  # lt spent
                del lt
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


def logit_loss(h_s, w_s, h_t, w_t, labels, temperature=1.0, kl_w=1.0, ce_w=0.0, chunk=1024):
    """Chunked logit loss of flattened tokens: (scalar loss, [kl_sum, ce_sum]) over N tokens."""
    return ChunkedDistillLoss.apply(h_s, w_s, h_t, w_t, labels, float(temperature), float(kl_w),
                                    float(ce_w), int(chunk))


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

    def forward(self, ids, t_last, t_states, t_weight):
        """Loss of one micro-batch `ids` given the teacher's final hidden states `t_last` (None
        when only CE is trained), its hidden states at the paired indices `t_states` and its
        lm_head weight."""
        s = self.settings
        with hidden_states(self.student, [i for i, _ in self.pairs]) as s_states:
            out = self.student.model(input_ids=ids, use_cache=False)
        h_s = out.last_hidden_state[:, :-1].flatten(0, 1)
        h_t = t_last[:, :-1].flatten(0, 1) if t_last is not None else None
        labels = ids[:, 1:].flatten()
        loss, stats = logit_loss(h_s, self.student.lm_head.weight, h_t, t_weight, labels,
                                 s["temperature"], s["kl_w"], s["ce_w"], s["chunk"])
        hid = torch.zeros((), device=loss.device)
        if self.pairs:
            hid = sum(cosine_loss(self.proj(s_states[i]), t_states[j])
                      for i, j in self.pairs) / len(self.pairs)
            # Minitron: the intermediate loss is rescaled to the logit loss's magnitude
            loss = loss + hid * (loss.detach() / hid.detach().clamp(min=1e-8))
        return loss, stats, hid.detach(), labels.numel()

    def held_out(self, rows, batch_size, teacher, chunk):
        """common.evaluate on the student (a method, so that FSDP can gather it for the call)."""
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


# Dense bf16 tensor-core peaks per device (NVIDIA datasheets: A100 312 TFLOP/s, H100/H200 SXM
# 989); the PCIe and NVL boards of H100/H200 are slower and left to PEAK_TFLOPS.
KNOWN_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def peak_tflops(device: str, override: float | None) -> float | None:
    """PEAK_TFLOPS, else the datasheet peak of a known GPU, else None (MFU not shown)."""
    if override:
        return float(override)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        if "A100" not in name and ("PCIe" in name or "NVL" in name):
            return None
        return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)
    return None


def state_gib(s_conf, t_conf, teacher_dtype: torch.dtype, shards: int) -> dict:
    """Weights, gradients and optimizer state one process holds, in GiB (activations not
    included): the student trains in float32 with AdamW, 16 bytes per parameter (weight,
    gradient, two moments); the teacher only has weights. Under FSDP (`shards` processes) each
    holds 1/shards of both, plus the teacher's lm_head whole."""
    def params(c):
        return common.param_count(common.shape_of(c), c)["total"]
    student = 16 * params(s_conf) / shards
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


def start_position() -> dict:
    """Where `row_stream` begins: epoch 0, no rows, documents or carried tokens yet."""
    return {"epoch": 0, "row": 0, "documents": 0, "carry": []}


def row_stream(dataset: str, tokenizer, seq_len: int, seed: int, held_out: int, position: dict,
               say=print):
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
                                   f"a smaller SEQ_LEN or EVAL_DATASET")
        say(f"data: DATASET has {position['row'] - held_out} training rows of {seq_len} tokens; "
            f"repeating it (epoch {position['epoch'] + 2})")
        position.update(start_position(), epoch=position["epoch"] + 1)


def local_batch(stream, global_batch: int, rank: int, world: int) -> torch.Tensor:
    """This process's share of the next global batch of rows (every process reads them all)."""
    rows = torch.stack([next(stream) for _ in range(global_batch)])
    share = global_batch // world
    return rows[rank * share:(rank + 1) * share]


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "progress.json").is_file())


# ---- sharding (FSDP2) -----------------------------------------------------------------------

def empty_model(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """The architecture of `config` without weights (meta device), for a process that will
    receive its shards from the first process instead of reading the checkpoint itself."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
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


def save_sharded(path: Path, model, optimizer, scheduler, rank: int) -> None:
    """Model and optimizer as a torch.distributed.checkpoint (each process writes its shards),
    scheduler and this process's RNG next to it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    torch.save({"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               path / f"extra-{rank}.pt")


def load_sharded(path: Path, model, optimizer, scheduler, rank: int) -> None:
    """Inverse of save_sharded; the checkpoint may come from another number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra = path / f"extra-{rank}.pt"
    extra = torch.load(extra if extra.exists() else path / "extra-0.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    if extra["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["cuda_rng"])


def full_student(model, student_dir: str, trust_remote_code: bool):
    """The sharded student gathered into an ordinary model on the first process (None on the
    others); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    if not sd:
        return None
    student = common.load_model(student_dir, "cpu", torch.float32, trust_remote_code)
    student.load_state_dict({k.removeprefix("student."): v for k, v in sd.items()
                             if k.startswith("student.")})
    return student


# ---- main -----------------------------------------------------------------------------------

def check_resumable(progress: dict, path: Path, cfg, shard: bool, world: int, say=print) -> None:
    """Refuse to resume from the checkpoint at `path` (its progress.json: `progress`) when the
    losses would not continue: other settings, the other checkpoint format, no data position."""
    changed = {k: (progress["config"].get(k), v) for k, v in vars(cfg).items()
               if k not in _RESUMABLE and progress["config"].get(k) != v}
    if changed:
        raise common.UserError(f"{path} was written with other settings {changed} "
                               f"(saved, now); restore them or delete {path.parent}")
    was_sharded = bool(progress.get("fsdp", progress["config"].get("FSDP")))
    if was_sharded != shard:
        raise common.UserError(f"{path} was written with FSDP={was_sharded} (sharded checkpoint "
                               f"or not); resume with the same FSDP and launch, or delete "
                               f"{path.parent}")
    if "data" not in progress:
        raise common.UserError(f"{path} has no data position (written by an older version); "
                               f"delete {path.parent} to start again")
    if progress["world"] != world:
        say(f"warning: checkpoint written by {progress['world']} processes, resuming on "
            f"{world}: same data order, losses equal only within float tolerance")


def load_pair(cfg, teacher_name: str, configs: tuple, dtype: torch.dtype, device: str,
              shard: bool, rank: int):
    """(student in float32, ready to train; teacher in `dtype`, frozen). Under FSDP they are
    read into CPU memory by the first process only (FSDP moves each shard to the device as it
    cuts it); the other processes get empty models of `configs` (student's, teacher's) and
    receive their shards later."""
    if shard and rank > 0:
        student = empty_model(configs[0], torch.float32, cfg.TRUST_REMOTE_CODE)
        teacher = empty_model(configs[1], dtype, cfg.TRUST_REMOTE_CODE)
    else:
        where = "cpu" if shard else device
        student = common.load_model(cfg.STUDENT, where, torch.float32, cfg.TRUST_REMOTE_CODE)
        teacher = common.load_model(teacher_name, where, dtype, cfg.TRUST_REMOTE_CODE)
    teacher.requires_grad_(False)
    if cfg.GRADIENT_CHECKPOINTING:
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.2x
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    student.train()
    return student, teacher


def validate(cfg):
    """Cheap checks on the constants alone."""
    for name in ("SEQ_LEN", "BATCH_SIZE", "GLOBAL_BATCH", "CHUNK_TOKENS", "LOG_EVERY",
                 "EVAL_EVERY", "KEEP_CHECKPOINTS"):
        if getattr(cfg, name) < 1:
            raise common.UserError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("EVAL_SAMPLES", "CHECKPOINT_EVERY", "WARMUP_STEPS", "HIDDEN_LOSS_LAYERS",
                 "KL_WEIGHT", "CE_WEIGHT", "LR", "MIN_LR"):
        if getattr(cfg, name) < 0:
            raise common.UserError(f"{name} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.SEQ_LEN < 2:
        raise common.UserError("SEQ_LEN must be at least 2 (one next-token prediction)")
    if cfg.KL_WEIGHT == 0 and cfg.CE_WEIGHT == 0:
        raise common.UserError("KL_WEIGHT and CE_WEIGHT are both 0: nothing to train")
    if cfg.TEMPERATURE <= 0:
        raise common.UserError(f"TEMPERATURE must be positive, got {cfg.TEMPERATURE}")
    if cfg.MIN_LR > cfg.LR:
        raise common.UserError(f"MIN_LR={cfg.MIN_LR} is above LR={cfg.LR}")
    if cfg.MAX_STEPS is not None and (not isinstance(cfg.MAX_STEPS, int) or cfg.MAX_STEPS < 1):
        raise common.UserError(f"MAX_STEPS must be a positive integer or None, got {cfg.MAX_STEPS!r}")
    if cfg.STOP_AT_STEP is not None and (not isinstance(cfg.STOP_AT_STEP, int) or cfg.STOP_AT_STEP < 1):
        raise common.UserError("STOP_AT_STEP must be a positive integer or None")


def resolve_models(cfg):
    """Student record, teacher name, configs and tokenizers, checked to be compatible."""
    if not Path(cfg.STUDENT).is_dir():
        raise common.UserError(f"STUDENT={cfg.STUDENT!r} is not a directory; run prune.py first "
                               f"or set STUDENT to the pruned model's directory")
    record = common.read_record(cfg.STUDENT)
    teacher = cfg.TEACHER or (record or {}).get("source_model")
    if teacher is None:
        raise common.UserError(f"STUDENT={cfg.STUDENT!r} has no {common.RECORD} naming its source "
                               f"model; set TEACHER")
    s_conf = common.load_config(cfg.STUDENT, cfg.TRUST_REMOTE_CODE)
    try:
        t_conf = common.load_config(teacher, cfg.TRUST_REMOTE_CODE)
    except common.UserError as e:
        raise common.UserError(f"cannot load the teacher TEACHER={teacher!r}: {e}") from None
    common.family_of(s_conf), common.family_of(t_conf)
    s_tok = common.load_tokenizer(cfg.STUDENT, cfg.TRUST_REMOTE_CODE)
    t_tok = common.load_tokenizer(teacher, cfg.TRUST_REMOTE_CODE)
    why = tokenizer_mismatch(s_tok, t_tok)
    if why is None and s_conf.vocab_size != t_conf.vocab_size:
        why = f"vocab_size differs ({s_conf.vocab_size} vs {t_conf.vocab_size})"
    if why:
        raise common.UserError(f"student {cfg.STUDENT!r} and teacher {teacher!r} do not share a "
                               f"tokenizer: {why}; the KL needs the same token ids")
    return record or {}, teacher, s_conf, t_conf, s_tok


def main(argv: list[str]) -> dict:
    quiet = int(os.environ.get("RANK", "0")) > 0  # launched processes other than the first
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        cfg = common.configure(globals(), argv)
    validate(cfg)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    out_dir = common.check_writable(cfg.OUTPUT, "OUTPUT", is_dir=True)
    ckpt_root = common.check_writable(cfg.CHECKPOINT_DIR or f"{cfg.OUTPUT}-checkpoints",
                                      "CHECKPOINT_DIR", is_dir=True)
    record, teacher_name, s_conf, t_conf, tokenizer = resolve_models(cfg)

    device = common.pick_device(cfg.DEVICE)
    acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device.startswith("cuda") else "no")
    world, rank, main_proc = acc.num_processes, acc.process_index, acc.is_main_process
    say = print if main_proc else (lambda *a, **k: None)
    shard = cfg.FSDP or acc.distributed_type == DistributedType.FSDP
    if shard and world < 2:
        raise common.UserError("FSDP=True shards the models over several processes; start them "
                               "with `accelerate launch --num_processes N distill.py FSDP=True`")
    if cfg.GLOBAL_BATCH % (cfg.BATCH_SIZE * world):
        raise common.UserError(f"GLOBAL_BATCH={cfg.GLOBAL_BATCH} is not a multiple of BATCH_SIZE="
                               f"{cfg.BATCH_SIZE} x {world} processes")
    accum = cfg.GLOBAL_BATCH // (cfg.BATCH_SIZE * world)
    tokens_per_step = cfg.GLOBAL_BATCH * cfg.SEQ_LEN
    max_steps = cfg.MAX_STEPS or max(1, cfg.TOTAL_TOKENS // tokens_per_step)
    stop = min(max_steps, cfg.STOP_AT_STEP or max_steps)

    # data first: empty or too-short data fails before any model is loaded
    held = cfg.EVAL_SAMPLES if cfg.EVAL_DATASET is None else 0
    eval_rows = torch.empty(0, cfg.SEQ_LEN, dtype=torch.long)
    if cfg.EVAL_SAMPLES:
        eval_rows = common.calibration_rows(cfg.EVAL_DATASET or cfg.DATASET, tokenizer,
                                            cfg.EVAL_SAMPLES, cfg.SEQ_LEN, cfg.SEED)
        if cfg.EVAL_DATASET is None:
            held = len(eval_rows)
    saved = checkpoints(ckpt_root)
    progress = json.loads((saved[-1] / "progress.json").read_text()) if saved else None
    if progress:
        check_resumable(progress, saved[-1], cfg, shard, world, say)
    start_step = progress["step"] if progress else 0
    position = progress["data"] if progress else start_position()
    stream = row_stream(cfg.DATASET, tokenizer, cfg.SEQ_LEN, cfg.SEED, held, position, say)
    first = local_batch(stream, cfg.GLOBAL_BATCH, rank, world) if start_step < stop else None

    dtype = common.pick_dtype(cfg.DTYPE, device)
    dev = str(acc.device)
    need = state_gib(s_conf, t_conf, dtype, world if shard else 1)
    total = sum(need.values())
    say(f"memory: about {total:.1f} GiB per process before activations (student weights, "
        f"gradients and AdamW state {need['student']:.1f} GiB, teacher {need['teacher']:.1f} GiB"
        f"{', sharded over ' + str(world) + ' processes' if shard else ''})")
    if device.startswith("cuda"):
        have = torch.cuda.get_device_properties(acc.device).total_memory / 2**30
        if total > 0.9 * have:
            say(f"warning: that is more than 90% of this GPU's {have:.0f} GiB; expect out-of-memory"
                f"{'' if shard else ': shard both models with FSDP=True over several GPUs'}")
    t0 = time.time()
    set_seed(cfg.SEED)
    student, teacher = load_pair(cfg, teacher_name, (s_conf, t_conf), dtype, dev, shard, rank)
    n_s, n_t = s_conf.num_hidden_layers, t_conf.num_hidden_layers
    kept = (record.get("kept") or {}).get("layers") or list(range(n_s))
    n_source = (record.get("source_shape") or {}).get("num_hidden_layers", n_t)
    pairs = []
    if use_hidden_loss(n_s, n_t, cfg.HIDDEN_LOSS_DEPTH_CUT):
        if len(kept) != n_s:
            raise common.UserError(f"{common.RECORD} lists {len(kept)} kept layers but STUDENT has {n_s}")
        pairs = hidden_pairs(kept, n_source, n_t, cfg.HIDDEN_LOSS_LAYERS)
    same_source = teacher_name == record.get("source_model")
    kept_hidden = (record.get("kept") or {}).get("hidden") if same_source else None
    proj = make_proj(s_conf.hidden_size, t_conf.hidden_size, kept_hidden if pairs else None)
    settings = {"temperature": cfg.TEMPERATURE, "kl_w": cfg.KL_WEIGHT, "ce_w": cfg.CE_WEIGHT,
                "chunk": cfg.CHUNK_TOKENS}
    model = Distiller(student, proj.to(student.device) if pairs else torch.nn.Identity(), pairs,
                      settings)
    if shard:
        full = (model.state_dict(), teacher.state_dict()) if rank == 0 else ({}, {})
        shard_models(model, teacher, dev, world, bf16=device.startswith("cuda"))
        if rank == 0:  # the others' lm_head is still empty: broadcast_weights places it
            teacher.lm_head.to(dev)
        broadcast_weights(model, full[0], dev, rank)
        broadcast_weights(teacher, full[1], dev, rank)
        del full
        (s_mine, s_all), (t_mine, t_all) = local_share(model), local_share(teacher.model)
        say(f"fsdp: {world} processes; this one holds {s_mine:,} of {s_all:,} student parameters "
            f"and {t_mine:,} of {t_all:,} teacher decoder parameters")
    say(f"models: student {s_conf.architectures} {n_s} layers, teacher {teacher_name} {n_t} layers, "
        f"on {dev} ({world} process{'es' if world > 1 else ''}), loaded in {time.time() - t0:.1f}s")
    say(f"hidden_loss: {'on, (student, teacher) hidden states ' + str(pairs) if pairs else 'off'} "
        f"(depth cut {1 - n_s / n_t:.0%}, threshold {cfg.HIDDEN_LOSS_DEPTH_CUT:.0%})")
    say(f"batch: {cfg.GLOBAL_BATCH} rows x {cfg.SEQ_LEN} tokens = {tokens_per_step} tokens/step "
        f"= {world} processes x {accum} micro-batches x {cfg.BATCH_SIZE} rows; {max_steps} steps "
        f"= {max_steps * tokens_per_step / 1e6:.2f}M tokens")
    need_teacher = cfg.KL_WEIGHT > 0 or bool(pairs)
    # the teacher runs only for the KL or the hidden-state loss, its lm_head only for the KL
    t_flops = (forward_flops_per_token(t_conf, cfg.SEQ_LEN, lm_head=cfg.KL_WEIGHT > 0)
               if need_teacher else 0)
    flops_token = 3 * forward_flops_per_token(s_conf, cfg.SEQ_LEN) + t_flops
    peak = peak_tflops(device, cfg.PEAK_TFLOPS)
    peak_s = f"{peak:g} TFLOP/s per device" if peak else "no known peak (set PEAK_TFLOPS)"
    say(f"flops: {flops_token / 1e9:.3f} GFLOP per token (student forward+backward 3x"
        f"{', teacher forward 1x' if need_teacher else ', no teacher'}); MFU against {peak_s}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.LR,
                                  betas=(0.9, cfg.BETA2), weight_decay=cfg.WEIGHT_DECAY)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.WARMUP_STEPS, max_steps, min_lr_rate=cfg.MIN_LR / cfg.LR if cfg.LR else 0.0)
    if not shard:
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step
    if progress:
        if shard:
            load_sharded(saved[-1], model, optimizer, scheduler, rank)
        else:
            acc.load_state(str(saved[-1]))
        say(f"resume: {saved[-1]} (step {start_step}, {progress['tokens']} tokens seen)")
    inner = model if shard else acc.unwrap_model(model)

    def evaluate():
        if not len(eval_rows):
            return {}
        inner.student.eval()
        with acc.autocast():
            m = inner.held_out(eval_rows.to(dev), cfg.BATCH_SIZE, teacher, cfg.CHUNK_TOKENS)
        inner.student.train()
        return m

    def save_checkpoint(step, tokens):
        tmp = ckpt_root / f".step-{step:07d}.tmp"
        if main_proc and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        if shard:
            save_sharded(tmp, model, optimizer, scheduler, rank)
        else:
            acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if main_proc:
            (tmp / "progress.json").write_text(json.dumps(
                {"step": step, "tokens": tokens, "rows": step * cfg.GLOBAL_BATCH, "world": world,
                 "data": position, "fsdp": shard,
                 "ref_loss": ref_loss, "start": start_metrics, "config": vars(cfg)},
                indent=2, default=str))
            final = ckpt_root / f"step-{step:07d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoints(ckpt_root)[:-cfg.KEEP_CHECKPOINTS]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    ref_loss = progress["ref_loss"] if progress else None
    start_metrics = progress["start"] if progress else {}
    tokens = progress["tokens"] if progress else 0
    if not progress and (main_proc or shard):  # under FSDP every process takes part
        start_metrics = evaluate()
        if start_metrics:
            say(f"teacher: held-out ppl {start_metrics['teacher_ppl']:.3f} on "
                f"{start_metrics['tokens']} tokens (reference)")
            say(f"eval step {0:>6} | kl {start_metrics['kl']:.4f} | ppl {start_metrics['student_ppl']:.3f}")

    losses, metrics = [], start_metrics
    bar = tqdm(total=stop, initial=start_step, desc="distill", disable=not main_proc)
    t_train, tok_run = 0.0, 0  # time and tokens of the training steps alone (no eval, no saving)
    step = start_step
    while step < stop:
        t_step = time.time()
        rows = first if first is not None else local_batch(stream, cfg.GLOBAL_BATCH, rank, world)
        first = None
        micro = rows.view(accum, cfg.BATCH_SIZE, cfg.SEQ_LEN).to(dev)
        total = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, kl_sum, ce_sum, hid
        for k in range(accum):
            ids = micro[k]
            t_last, t_states = None, {}
            if need_teacher:
                with (torch.no_grad(), acc.autocast(),
                      hidden_states(teacher, [j for _, j in pairs]) as t_states):
                    t_last = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            # FSDP reduce-scatters every micro-batch's gradients: skipping that would keep
            # whole float32 gradients on every process until the last one
            sync = (acc.no_sync(model) if k < accum - 1 and not shard
                    else contextlib.nullcontext())
            with sync:
                loss, stats, hid, n_tok = model(ids, t_last, t_states, teacher.lm_head.weight)
                acc.backward(loss / accum)
            total += torch.stack([loss.detach().double(), stats[0] / n_tok, stats[1] / n_tok,
                                  hid.double()]) / accum
        if shard:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.GRAD_CLIP)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        else:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.GRAD_CLIP)
        total = acc.reduce(total, "mean")
        loss_v, kl_v, ce_v, hid_v = total.tolist()
        gn = float(grad_norm)
        if not (math.isfinite(loss_v) and math.isfinite(gn)):
            raise common.UserError(f"loss is {loss_v}, gradient norm {gn} at step {step + 1}: "
                                   f"training diverged; lower LR or check the data "
                                   f"(checkpoints: {ckpt_root})")
        ref_loss = loss_v if ref_loss is None else ref_loss
        if loss_v > cfg.ABORT_LOSS_FACTOR * max(ref_loss, 1e-2):
            raise common.UserError(f"loss exploded at step {step + 1}: {loss_v:.4f} > "
                                   f"{cfg.ABORT_LOSS_FACTOR} x the first step's {ref_loss:.4f}; "
                                   f"lower LR (checkpoints: {ckpt_root})")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        tok_run += tokens_per_step
        dt = time.time() - t_step
        t_train += dt
        losses.append(loss_v)
        bar.update(1)
        if main_proc and (step % cfg.LOG_EVERY == 0 or step == stop):
            kl_s = f"{kl_v:.4f}" if need_teacher and cfg.KL_WEIGHT else "-"  # not computed
            hid_s = f"{hid_v:.4f}" if pairs else "-"
            bar.write(f"step {step:>6}/{max_steps} | loss {loss_v:.4f} | kl {kl_s} | "
                      f"ce {ce_v:.4f} | hid {hid_s} | lr {lr:.2e} | grad {gn:.3f} | "
                      f"{tokens_per_step / dt:,.0f} tok/s | {dt:.2f}s")
        if eval_rows.numel() and (step % cfg.EVAL_EVERY == 0 or step == stop) and (main_proc or shard):
            metrics = evaluate()
            if main_proc:
                bar.write(f"eval step {step:>6} | kl {metrics['kl']:.4f} | "
                          f"ppl {metrics['student_ppl']:.3f}")
        acc.wait_for_everyone()
        if cfg.CHECKPOINT_EVERY and (step % cfg.CHECKPOINT_EVERY == 0 or step == stop < max_steps):
            save_checkpoint(step, tokens)
    bar.close()
    tok_s = tok_run / t_train if tok_run else 0.0
    tflops = tok_s * flops_token / world / 1e12  # per device
    mem, mem_kind = peak_memory_gib(device)

    summary = {"steps": step, "max_steps": max_steps, "tokens": tokens, "losses": losses,
               "start": start_metrics, "final": metrics, "tokens_per_s": tok_s,
               "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
               "peak_memory_gib": mem, "finished": step >= max_steps, "output": None}
    final_model = None
    if step >= max_steps:
        final_model = (full_student(model, cfg.STUDENT, cfg.TRUST_REMOTE_CODE) if shard
                       else inner.student if main_proc else None)
    if final_model is not None:
        final_model.config.head_dim = common.head_dim(final_model.config)
        final_model.config.layer_types = common.layer_types(final_model.config)
        final_model.to(common.stored_dtype(s_conf))
        rec = dict(record)
        rec.update(stage="distill", versions=common.versions(), distill={
            "config": vars(cfg), "student": cfg.STUDENT, "teacher": teacher_name,
            "steps": step, "tokens_seen": tokens, "processes": world, "fsdp": shard,
            "throughput": {k: summary[k] for k in ("tokens_per_s", "tflops_per_device", "mfu",
                                                   "peak_memory_gib")},
            "hidden_loss_pairs": pairs, "metrics": {"start": start_metrics, "final": metrics},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        common.write_checkpoint(final_model, cfg.STUDENT, str(out_dir), rec, cfg.TRUST_REMOTE_CODE)
        summary["output"] = str(out_dir)
    acc.wait_for_everyone()
    if main_proc:
        print(f"steps: {step}/{max_steps}")
        print(f"tokens: {tokens}")
        print(f"tokens_per_s: {tok_s:.1f}")  # training steps only, all processes together
        print(f"tflops_per_device: {tflops:.4g}")
        if peak:
            print(f"mfu: {tflops / peak:.3f}")
        print(f"peak_memory_gib: {mem:.2f} ({mem_kind}, first process)")
        if losses:
            print(f"loss_first: {losses[0]:.4f}")
            print(f"loss_last: {losses[-1]:.4f}")
        for name, m in (("start", start_metrics), ("final", metrics)):
            if m:
                print(f"{name}_kl: {m['kl']:.4f}")
                print(f"{name}_ppl: {m['student_ppl']:.3f}")
        if start_metrics:
            print(f"teacher_ppl: {start_metrics['teacher_ppl']:.3f}")
        print(f"output: {summary['output'] or 'none (stopped early; rerun to resume)'}")
    return summary


if __name__ == "__main__":
    common.run(main)
