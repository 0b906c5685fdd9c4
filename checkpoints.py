"""distill.py's checkpoints: where training stands (progress.json) and its tensors, written whole or
not at all, read back without unpickling code, and checked to continue the same run.

A checkpoint is OUTPUT-checkpoints/step-NNNNNNN/: progress.json, then model.pt and optimizer.pt
(one process) or a torch.distributed.checkpoint of the shards (FSDP), and each process's RNG.
"""

import json
import pickle
from pathlib import Path

import torch

import common

FORMAT = 2  # 2: tensors and JSON only (1 was accelerate's pickles, refused)
PROGRESS_KEYS = ("step", "tokens", "world", "fsdp", "data", "prompts", "ref_loss", "start",
                 "evals", "settings", "student", "teacher", "scheduler")


# ---- progress.json: the one writer and the one reader ------------------------------------------

def write_progress(path: Path, progress: dict):
    """progress.json of checkpoint `path`: where training stands and what it belongs to."""
    assert set(progress) == set(PROGRESS_KEYS), sorted(progress)  # a programming error
    (path / "progress.json").write_text(json.dumps({"format": FORMAT, **progress}, indent=2,
                                                   default=str))


def read_progress(path: Path) -> dict:
    """progress.json of checkpoint `path`, or a UserError naming it."""
    fix = f"delete {path.parent} to start again"
    progress = common.read_json(path / "progress.json", "checkpoint progress file",
                                ("format", *PROGRESS_KEYS), fix=fix)
    if progress["format"] != FORMAT or not isinstance(progress["ref_loss"], dict):
        raise common.UserError(f"{path} was written by an older version of distill.py; {fix}")
    return progress


def is_root(path: Path) -> bool:
    """Whether `path` is a checkpoint directory of distill.py (which a later run may write into)."""
    return common.is_record_of(path, "distill-checkpoints")


def complete(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "progress.json").is_file())


def check_resumable(progress: dict, path: Path, settings: dict, resumable: set, ids: dict,
                    shard: bool, world: int):
    """Refuse to resume from checkpoint `path` when the losses would not continue: other
    `settings` (but those in `resumable`), another student or teacher (`ids`: their
    fingerprints now, by content), the other format (sharded or not)."""
    changed = common.changed_settings(progress["settings"], settings, resumable)
    if changed:
        raise common.UserError(f"{path} was written with other settings {changed} "
                               f"(saved, now); restore them or delete {path.parent}")
    for who in ("student", "teacher"):
        if progress[who] != ids[who]:
            why = (f"the {who} was recorded by an older version of Pare" if
                   progress[who].startswith("sha256:") and ids[who].startswith("hub:")
                   else f"the {who} was replaced since")
            raise common.UserError(f"{path} belongs to another {who} (fingerprint "
                                   f"{progress[who]}, now {ids[who]}: {why}); delete "
                                   f"{path.parent} to start again")
    if bool(progress["fsdp"]) != shard:
        raise common.UserError(f"{path} was written with FSDP={progress['fsdp']} (sharded "
                               f"checkpoint or not); resume with the same FSDP, or delete "
                               f"{path.parent}")
    if progress["world"] != world:
        common.print0(f"warning: checkpoint written by {progress['world']} processes, resuming on "
                      f"{world}: same data order, losses equal only within float tolerance")


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path`'s files, found without loading them (a file missing,
    or truncated: a torch file's zip directory sits at its end), or None."""
    import zipfile
    if (path / ".metadata").is_file():  # sharded (FSDP): DCP's files
        needed = [path / ".metadata", path / "param_groups.json", path / "rng-0.pt"]
    else:
        needed = [path / "model.pt", path / "optimizer.pt", path / "rng-0.pt"]
    for f in needed:
        if not f.is_file():
            return f"{f.name} is missing"
        if f.suffix == ".pt" and not zipfile.is_zipfile(f):
            return f"{f.name} is truncated or corrupt"
    return None


def latest(root: Path, settings: dict, resumable: set, ids: dict, shard: bool, world: int
           ) -> tuple[Path | None, dict | None]:
    """(the newest intact checkpoint under `root`, its progress), checked to resume; (None,
    None) when there is none. A damaged newer one is passed over with a warning (it is left
    where it is)."""
    saved = complete(root)
    for k, path in enumerate(reversed(saved)):
        why = damage(path)
        if why is None:
            progress = read_progress(path)  # another version or other settings: refused
            check_resumable(progress, path, settings, resumable, ids, shard, world)
            return path, progress
        then = "resuming from the one before it" if k + 1 < len(saved) else "starting afresh"
        common.print0(f"warning: checkpoint {path} is damaged ({why}); {then}")
    return None, None


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


# ---- tensors: plain files of one process (torch.load weights_only=True) ---------------------

def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


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
    state = load_tensors(rng if rng.exists() else path / "rng-0.pt")
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


def load_state(path: Path, model, optimizer, rank: int, device: str):
    """Inverse of save_state; nothing is unpickled beyond tensors and plain containers."""
    model.load_state_dict(load_tensors(path / "model.pt", device))
    optimizer.load_state_dict(load_tensors(path / "optimizer.pt", device))
    load_rng(path, rank)


# ---- tensors of a sharded run (FSDP): torch.distributed.checkpoint, its metadata allow-listed --

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


# ---- writing a checkpoint whole, and keeping the last few --------------------------------------

def mark_root(root: Path, output: str):
    """Create `root` with a record saying it is distill.py's checkpoint directory (so that a
    later run may write into it) and drop the temporaries of killed runs."""
    if not is_root(root):
        with common.writing(root):
            root.mkdir(parents=True, exist_ok=True)
            (root / common.RECORD).write_text(json.dumps(
                {"stage": "distill-checkpoints", "output": output, "created": common.now()}) + "\n")
    for tmp in root.glob(".step-*.tmp"):
        common.remove(tmp)


def save(root: Path, progress: dict, model, optimizer, acc, shard: bool, keep: int) -> Path:
    """Checkpoint progress["step"] under `root`, written to a temporary directory and renamed
    when complete (a killed run leaves only a temporary that the next run removes); the oldest
    beyond the `keep` newest are deleted. Every process must call it."""
    step = progress["step"]
    tmp, final = root / f".step-{step:07d}.tmp", root / f"step-{step:07d}"
    rank = acc.process_index
    if rank == 0:
        mark_root(root, progress["settings"]["OUTPUT"])
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
                write_progress(tmp, progress)
                common.remove(final)
                tmp.rename(final)
                # the newest `keep` up to this step stay (a damaged later one is left alone)
                for old in [p for p in complete(root) if step_of(p) <= step][:-keep]:
                    common.remove(old)
    finally:
        if rank == 0:
            common.remove(tmp)  # a failed write leaves no half checkpoint (gone once renamed)
    acc.wait_for_everyone()
    return final


def clear(root: Path):
    """Remove a finished run's checkpoints (its output is complete; a rerun must not resume from
    them): the step directories and the record; `root` itself only when nothing else is in it."""
    if not common.is_first_process() or not is_root(root):
        return
    for p in [*root.glob("step-*"), *root.glob(".step-*.tmp"), root / common.RECORD]:
        common.remove(p)
    if any(root.iterdir()):
        common.print0(f"note: {root} keeps files Pare did not write; its checkpoints are removed")
    else:
        root.rmdir()


def adopt(src: Path, root: Path, output: str) -> Path:
    """A copy of checkpoint `src` (a selection candidate's) as the newest one under `root`."""
    import shutil
    final = root / src.name
    if common.is_first_process() and not final.exists():
        mark_root(root, output)
        common.write_atomic(final, lambda tmp: shutil.copytree(src, tmp))
    return final
