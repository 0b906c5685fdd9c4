"""TEACHER_CACHE in distill.py: the teacher's top-k log-probabilities per token, computed once
into a directory and read by training instead of running the teacher (KL over the top k plus
one bucket for the rest of the vocabulary).

    uv run distill.py TEACHER=allenai/Olmo-3-32B-Instruct TEACHER_CACHE=out/cache TOPK=64

The directory holds pare.json (the manifest: `new_manifest` builds it, `read_manifest` reads it),
eval.safetensors (the held-out rows) and train-NNNNNN.safetensors (the training rows in
common.row_stream's order, `shard_rows` a file). Per row and predicted token: `ids` (int32) and
`logp`, the teacher's k most likely next tokens, sorted by id, and their log-probabilities
(temperature 1); `rest`, the log of the teacher's probability outside them; `target`, its
log-probability of the actual next token (for its perplexity); per row `row_hash`, which the
reader compares with the rows the run reads, so other text can never meet these targets.
"""

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common

FORMAT = 1
MANIFEST_KEYS = ("stage", "format", "teacher", "teacher_fingerprint", "teacher_layers",
                 "tokenizer", "vocab_size", "data", "topk", "dtype", "shard_rows", "rows",
                 "versions", "created")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- identity: which teacher, tokenizer and rows a cache holds --------------------------------

def check_knobs(topk: int, divergence: str, temperature: float):
    """TEACHER_CACHE with knobs and recipe constants a cache cannot serve: one clear error."""
    if topk < 1:
        raise common.UserError(f"TOPK must be at least 1, got {topk}")
    if divergence != "forward_kl":
        raise common.UserError(f"a TEACHER_CACHE gives the forward KL only (its top k are the "
                               f"teacher's, not the student's): DIVERGENCE={divergence!r} "
                               f"needs the live teacher (TEACHER_CACHE=None)")
    if temperature != 1:
        raise common.UserError(f"a TEACHER_CACHE holds temperature-1 log-probabilities; "
                               f"_TEMPERATURE={temperature} in distill.py needs the live "
                               f"teacher (TEACHER_CACHE=None)")


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


def new_manifest(teacher: str, teacher_id: str, teacher_layers: int, tokenizer, vocab_size: int,
                 data: dict, topk: int, dtype: str, shard_rows: int) -> dict:
    """The manifest of a new cache: its teacher, tokenizer, `data` (the settings that decide
    which rows it holds, in which order), k and storage."""
    return {"stage": "teacher-cache", "format": FORMAT, "teacher": teacher,
            "teacher_fingerprint": teacher_id, "teacher_layers": teacher_layers,
            "tokenizer": tokenizer_hash(tokenizer), "vocab_size": vocab_size, "data": data,
            "topk": topk, "dtype": dtype, "shard_rows": shard_rows, "rows": 0,
            "versions": common.versions(), "created": common.now()}


def read_manifest(path: Path) -> dict | None:
    """The manifest of the cache at `path`, None when there is none yet."""
    f = path / common.RECORD
    if not f.is_file():
        return None
    if not common.is_record_of(path, "teacher-cache"):
        raise common.UserError(f"TEACHER_CACHE={str(path)!r} is not a teacher cache (see its "
                               f"{common.RECORD}); give a new directory")
    manifest = common.read_json(f, "teacher cache manifest", MANIFEST_KEYS,
                                fix=f"delete {path} to start the cache again")
    if manifest["format"] != FORMAT or manifest["dtype"] not in DTYPES:
        raise common.UserError(f"{f} is not a teacher cache manifest of this version of Pare; "
                               f"delete {path} to start the cache again")
    return manifest


def write_manifest(path: Path, manifest: dict):
    if common.is_first_process():
        common.write_atomic(path / common.RECORD,
                            lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))


def check_manifest(manifest: dict, data: dict, topk: int, where: str):
    """Refuse a cache written for other rows or another k before any work."""
    changed = common.changed_settings({**manifest["data"], "TOPK": manifest["topk"]},
                                      {**data, "TOPK": topk})
    if changed:
        raise common.UserError(f"{where} was written for other settings {changed} (cache, now): "
                               f"its rows would not be this run's; restore them or give a new "
                               f"TEACHER_CACHE")


def check_student(manifest: dict, where: str, teacher_knob: str | None, student: str, s_conf,
                  tokenizer):
    """The cache's teacher is TEACHER (when set) and shares the student's tokenizer."""
    name = manifest["teacher"]
    if teacher_knob is not None and teacher_knob != name and (
            common.model_files(teacher_knob) is None
            or common.fingerprint(teacher_knob, "TEACHER") != manifest["teacher_fingerprint"]):
        raise common.UserError(f"{where} holds the log-probabilities of {name!r}, not of "
                               f"TEACHER={teacher_knob!r}; leave TEACHER unset, or give a new "
                               f"TEACHER_CACHE for another teacher")
    if tokenizer_hash(tokenizer) != manifest["tokenizer"] or s_conf.vocab_size != manifest["vocab_size"]:
        raise common.UserError(f"STUDENT={student!r} does not share the tokenizer of the "
                               f"teacher {name!r} in {where}; the KL needs the same token ids")


def teacher_of(cache: str, data: dict, topk: int, teacher_knob: str | None, student: str,
               s_conf, tokenizer) -> tuple | None:
    """(name, fingerprint, layers) of the teacher of the cache at `cache` (TEACHER_CACHE), checked
    to serve this run (`data`, `topk`, TEACHER, the student's tokenizer); None when there is no
    cache there yet."""
    manifest = read_manifest(Path(cache).expanduser())
    if manifest is None:
        return None
    where = f"TEACHER_CACHE={cache!r}"
    check_manifest(manifest, data, topk, where)
    check_student(manifest, where, teacher_knob, student, s_conf, tokenizer)
    return manifest["teacher"], manifest["teacher_fingerprint"], manifest["teacher_layers"]


def check_teacher_unchanged(manifest: dict):
    """Before a fill: the teacher the cache was begun with has the same weights now."""
    name = manifest["teacher"]
    now = common.fingerprint(name, "the teacher in TEACHER_CACHE's manifest")
    if now != manifest["teacher_fingerprint"]:
        raise common.UserError(f"the teacher {name!r} changed since its cache was begun "
                               f"(fingerprint {manifest['teacher_fingerprint']}, now {now}); "
                               f"give a new TEACHER_CACHE")


# ---- reading: a run's targets, checked against the rows it reads ------------------------------

def shard_path(path: Path, index: int) -> Path:
    return path / f"train-{index:06d}.safetensors"


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
            try:
                common.check_safetensors(file, file.stat().st_size)
            except common.UserError:
                raise common.UserError(f"{file} in the teacher cache is truncated or corrupt; "
                                       f"delete it and run the same command again to write it "
                                       f"anew (the teacher is needed)") from None
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

    def summary(self) -> dict:
        """What pare.json records of the cache a run trained from."""
        return {"path": str(self.path), **{k: self.manifest[k] for k in (
            "topk", "dtype", "rows", "tokenizer")}}


# ---- filling: the teacher runs once over the rows a run needs ---------------------------------

def topk_entries(lt: torch.Tensor, k: int) -> tuple:
    """(ids, log-probabilities, log of the rest) of log-probabilities `lt` [n, vocab]: the k
    largest, sorted by token id (so that k = vocab keeps the vocabulary's order), and the log of
    the mass outside them (-inf when k = vocab)."""
    top, idx = lt.topk(k, dim=-1)
    idx, order = idx.sort(dim=-1)
    return idx, top.gather(1, order), lt.scatter(1, idx, -math.inf).logsumexp(-1)


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
            y = ids[:, 1:].flatten()
            for i, lt in common.chunked_log_probs(lambda x: x @ w.T, h, chunk):
                idx, top, rest = topk_entries(lt, k)
                parts["ids"].append(idx.int().cpu())
                parts["logp"].append(top.to(dtype).cpu())
                parts["rest"].append(rest.to(dtype).cpu())
                parts["target"].append(lt.gather(1, y[i:i + chunk, None])[:, 0].to(dtype).cpu())
    shape = (len(rows), rows.shape[1] - 1)
    out = {name: torch.cat(p).view(*shape, -1) for name, p in parts.items()}
    out["rest"], out["target"] = out["rest"][..., 0], out["target"][..., 0]
    return {**out, "row_hash": row_hashes(rows)}


def write_shard(path: Path, tensors: dict):
    from safetensors.torch import save_file
    common.write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                    str(tmp)))


def create(path: Path, manifest: dict) -> dict:
    """A new cache directory at `path` with its manifest (the first process; before any shard,
    so that it is known as a cache)."""
    with common.writing(path):
        if common.is_first_process():
            path.mkdir(parents=True, exist_ok=True)
    write_manifest(path, manifest)
    return manifest


def missing(path: Path, manifest: dict, n_rows: int, n_eval: int) -> tuple[int, int, bool]:
    """(shards held, shards needed for `n_rows` training rows, whether the held-out rows'
    file is missing)."""
    n_shards = math.ceil(n_rows / manifest["shard_rows"])
    have = sum(shard_path(path, s).is_file() for s in range(n_shards))
    return have, n_shards, n_eval > 0 and not (path / "eval.safetensors").is_file()


def check_cached_rows(path: Path, manifest: dict, rows, eval_rows: torch.Tensor, n_shards: int):
    """Before the teacher runs: the files the cache already has hold this run's rows (`rows`:
    the training rows in order; a DATASET edited since would otherwise be found only when
    training reaches them)."""
    cache, per = TeacherCache(path, manifest), manifest["shard_rows"]
    if len(eval_rows) and (path / "eval.safetensors").is_file():
        cache.held_out(eval_rows)
    have = [s for s in range(n_shards) if shard_path(path, s).is_file()]
    for s in range(max(have) + 1 if have else 0):
        batch = torch.stack([next(rows) for _ in range(per)])
        if s in have:
            cache.train_rows(s * per, batch)


def check_disk(path: Path, manifest: dict, seq_len: int, rows: int):
    """Refuse a fill the disk cannot hold, before the teacher runs."""
    size = DTYPES[manifest["dtype"]].itemsize
    need = rows * (seq_len - 1) * (manifest["topk"] * (4 + size) + 2 * size) + rows * 8
    free = shutil.disk_usage(path).free
    if need > free:
        raise common.UserError(f"TEACHER_CACHE={str(path)!r} needs about {need / 1e9:.1f} GB more "
                               f"({rows:,} rows at k={manifest['topk']}) and its disk has "
                               f"{free / 1e9:.1f} GB free; free space, lower TOPK or MAX_STEPS")


def fill(path: Path, manifest: dict, teacher, rows, eval_rows: torch.Tensor, n_shards: int,
         seq_len: int, batch_size: int, chunk: int, acc) -> dict:
    """Write the shards below `n_shards` (and the held-out rows' file) that `path` lacks: each
    process its own share (shard i: process i mod world), reading `rows`, the training rows in
    order (every process reads them all). A shard appears whole or not at all, so a killed fill
    resumes where it stopped. Returns what this process wrote: tokens, seconds, bytes."""
    rank, world = acc.process_index, acc.num_processes
    per, k, dtype = manifest["shard_rows"], manifest["topk"], DTYPES[manifest["dtype"]]
    todo = [s for s in range(n_shards) if s % world == rank and not shard_path(path, s).is_file()]
    mine_eval = rank == 0 and len(eval_rows) and not (path / "eval.safetensors").is_file()
    row_tokens = seq_len - 1
    n_tokens = (len(todo) * per + (len(eval_rows) if mine_eval else 0)) * row_tokens
    bar = tqdm(total=n_tokens, desc="teacher cache", unit="tok", unit_scale=True,
               disable=not common.is_first_process())
    t0, written = time.time(), 0

    def write(file: Path, batch: torch.Tensor):
        write_shard(file, teacher_topk(teacher, batch, k, batch_size, chunk, dtype, acc))
        bar.update(len(batch) * row_tokens)
        return file.stat().st_size

    if mine_eval:
        written += write(path / "eval.safetensors", eval_rows)
    for s in range(max(todo) + 1 if todo else 0):
        batch = torch.stack([next(rows) for _ in range(per)])
        if s in todo:
            written += write(shard_path(path, s), batch)
    bar.close()
    dt = time.time() - t0
    if n_tokens:
        common.print0(f"teacher cache: {len(todo)} shards, {n_tokens:,} tokens in {dt:.1f}s "
                      f"({n_tokens / dt:,.0f} tokens/s this process), {written / n_tokens:.1f} bytes "
                      f"per token (k={k}, {manifest['dtype']}: {4 + dtype.itemsize} bytes a kept "
                      f"logit)")
    return {"tokens": n_tokens, "seconds": dt, "bytes": written}


def prepare(path: Path, manifest: dict, n_rows: int, rows, eval_rows: torch.Tensor,
            seq_len: int, batch_size: int, chunk: int, acc, load_teacher) -> TeacherCache:
    """The cache at `path` (`manifest`: read, or just created), holding a run's first `n_rows`
    training rows and its held-out rows `eval_rows`: filled first where it lacks them, with the
    teacher that `load_teacher(name)` loads (only then). `rows()`: the run's training rows in
    order, a new iterator each call. What would fail later fails before the teacher loads.
    Every process must call it."""
    acc.wait_for_everyone()  # the manifest exists before any process looks for shards
    have, n_shards, lacks_eval = missing(path, manifest, n_rows, len(eval_rows))
    acc.wait_for_everyone()  # every process decided on the same files before any write
    filled = None
    if have < n_shards or lacks_eval:
        common.print0(f"teacher cache: {path} holds {have} of the {n_shards} shards this run "
                      f"needs ({n_rows} rows){' and not the held-out rows' if lacks_eval else ''}; "
                      f"filling them with the teacher {manifest['teacher']}")
        check_cached_rows(path, manifest, rows(), eval_rows, n_shards)
        check_disk(path, manifest, seq_len, (n_shards - have) * manifest["shard_rows"]
                   + (len(eval_rows) if lacks_eval else 0))
        try:
            teacher = load_teacher(manifest["teacher"])  # first: a hub model's files are then there
        except common.UserError as e:
            raise common.UserError(f"the teacher cache lacks rows this run needs, and its teacher "
                                   f"cannot be read ({e})") from None
        check_teacher_unchanged(manifest)
        try:
            filled = fill(path, manifest, teacher, rows(), eval_rows, n_shards, seq_len,
                          batch_size, chunk, acc)
        except KeyboardInterrupt:  # every shard is written whole: those done are kept
            raise common.Interrupted(f"the teacher cache {path} keeps the shards it completed; "
                                     f"run the same command again to fill the rest") from None
        del teacher
        acc.wait_for_everyone()
        manifest["rows"] = max(manifest["rows"], n_shards * manifest["shard_rows"])
        write_manifest(path, manifest)
    common.print0(f"teacher cache: {path}, k={manifest['topk']} of {manifest['teacher']}'s "
                  f"log-probabilities, {manifest['rows']} rows; no teacher runs in training")
    return TeacherCache(path, manifest, filled)
