"""FSDP=True in distill.py: the student (with its hidden-state map) and the teacher sharded over
all processes with FSDP2, one decoder layer a group, and the student gathered back for saving.

    uv run accelerate launch --num_processes 8 distill.py FSDP=True
"""

import torch

import common


def empty_model(config, dtype: torch.dtype):
    """The architecture of `config` without weights (meta device), for a process that will
    receive its shards from the first process instead of reading the checkpoint itself."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def shard_models(model, teacher, device: str, world: int, bf16: bool) -> None:
    """Shard `model` (distill's Distiller: student + map) and the teacher's decoder over all
    processes in place.

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


def shard(model, teacher, device: str, world: int, rank: int, bf16: bool) -> None:
    """Shard `model` and `teacher` (None: a teacher cache stands in) in place, their weights
    coming from the first process (the others built them empty, see `empty_model`)."""
    full = (model.state_dict(), teacher.state_dict() if teacher else {}) if rank == 0 else ({}, {})
    shard_models(model, teacher, device, world, bf16)
    if rank == 0 and teacher:  # the others' lm_head is still empty: broadcast_weights places it
        teacher.lm_head.to(device)
    broadcast_weights(model, full[0], device, rank)
    s_mine, s_all = local_share(model)
    held = f"{s_mine:,} of {s_all:,} student parameters"
    if teacher:
        broadcast_weights(teacher, full[1], device, rank)
        t_mine, t_all = local_share(teacher.model)
        held += f" and {t_mine:,} of {t_all:,} teacher decoder parameters"
    common.print0(f"fsdp: {world} processes; this one holds {held}")


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
