"""What distill.py's training costs: FLOPs per token (for MFU against a datasheet peak), and the
memory a process needs for weights, gradients and optimizer state, estimated before anything
loads and measured after.
"""

import resource

import torch

import common


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
    """`override` (distill's _PEAK_TFLOPS), else the datasheet peak of a known GPU, else None (no MFU)."""
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
