"""Infrastructure shared by Pare's three scripts; nothing here is part of the algorithm.

Configuration (`configure`, `recipe`), errors and exits (`UserError`, `run`, `print0`), paths
that never destroy a user's data (`check_output`, `write_atomic`, `writing`), model identity
(`fingerprint`), loading, calibration data, chunked held-out metrics and checkpoints with
Pare's `pare.json` record.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import types
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Printing, errors and exits

def is_first_process() -> bool:
    """False in the processes that `accelerate launch` starts after the first one."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs):
    """print() on the first process only (every script's one way to talk to the user)."""
    if is_first_process():
        print(*args, **kwargs)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, nothing written."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM after the script kept what it had finished: one line, exit status 130."""


# One Ctrl-C can reach a script twice within microseconds: `uv run` passes the SIGINT its process
# group received on to its child, which received it too (so do `timeout` and schedulers that
# signal a group). Deliveries of a signal closer together than this are one request.
REPEAT_WINDOW = 0.5  # seconds
_signals = {"name": None, "at": 0.0, "soft": 0, "say": ""}  # the first request, when, stop
# points entered (>0: record, do not raise), what the stop will do


def _on_signal(signum, frame):
    """SIGINT / SIGTERM: the first request raises KeyboardInterrupt, or inside `stop_requests`
    is recorded for the loop to stop at its next safe point; a repeated delivery within
    REPEAT_WINDOW is ignored; a later, deliberate second request stops at once."""
    now = time.monotonic()
    if _signals["name"] is not None:
        if now - _signals["at"] < REPEAT_WINDOW:
            return
        raise Interrupted("stopped at once (a second signal); what was complete is kept: run the "
                          "same command again to continue")
    _signals.update(name=signal.Signals(signum).name, at=now)
    if not _signals["soft"]:
        raise KeyboardInterrupt
    if is_first_process():  # os.write: print() is not reentrant, and the signal may land in one
        os.write(2, f"\n{_signals['name']}: {_signals['say']} (once more: stop at once)\n".encode())


@contextlib.contextmanager
def handling_signals():
    """SIGINT and SIGTERM handled by `_on_signal` inside the block (a fresh request state)."""
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _signals.update(name=None, at=0.0, soft=0)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_requests(say: str = "stopping at the next safe point"):
    """Inside the block a first Ctrl-C or SIGTERM does not interrupt: it is recorded (and `say`
    printed), and `stop_requested()` turns True for the code to stop at a safe point
    (distill.py: after the current step, with a checkpoint; never while writing its output)."""
    ours = signal.getsignal(signal.SIGINT) is _on_signal
    with contextlib.nullcontext() if ours else handling_signals():
        _signals["soft"] += 1
        _signals["say"] = say
        try:
            yield
        finally:
            _signals["soft"] -= 1


def stop_requested() -> bool:
    """Whether a Ctrl-C or SIGTERM asked this process to stop (see `stop_requests`)."""
    return _signals["name"] is not None


_claims: dict | None = None  # {output path: open lock file} while a script runs (common.run)


def run(main):
    """Call `main(sys.argv[1:])` with Ctrl-C and SIGTERM handled alike (`_on_signal`) and every
    output it checks claimed against a second writer (`claim`); a UserError is one `error:` line
    and exit status 2, an interrupt one `interrupted:` line and exit status 130 (never a
    traceback for either)."""
    global _claims
    _claims = {}
    with handling_signals():
        try:
            main(sys.argv[1:])
            ended = None
        except (UserError, Interrupted, KeyboardInterrupt) as e:
            ended = e
        finally:
            if _claims is not None:  # released (the lock files go with them)
                for target, f in _claims.items():
                    f.close()
                    target.with_name(f".{target.name}.lock").unlink(missing_ok=True)
            _claims = None
    if ended is None:
        return
    # the last line is printed whatever signal comes now
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if isinstance(ended, UserError):
            print(f"error: {ended}", file=sys.stderr)
            sys.exit(2)
        print(f"interrupted: {ended if isinstance(ended, Interrupted) else 'nothing was saved'}",
              file=sys.stderr)
        sys.exit(130)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Configuration: public UPPER_CASE knobs are overridable per run; _UPPER_CASE recipe constants are
# edited in the script, never per run, and recorded with the knobs in every artefact.

def knobs(namespace: dict) -> dict:
    """The per-run knobs of a script's module namespace, in order: its public UPPER_CASE
    constants that hold a string, number, bool, list or None (tuples, dicts and sets are the
    script's tables, not knobs)."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_")
            and (v is None or isinstance(v, (str, int, float, bool, list)))}


def recipe(namespace: dict) -> dict:
    """The recipe constants of a script (`_UPPER_CASE`), JSON-ready, for the artefact's record."""
    return {k: json.loads(json.dumps(v, default=str)) for k, v in namespace.items()
            if k.startswith("_") and k[1:2].isalpha() and k.isupper() and not callable(v)
            and not isinstance(v, types.ModuleType)}


def _parse_value(name: str, raw: str, default, annotation):
    """One override: a Python literal where it is one, else the raw string. It must fit the
    knob's annotation (`X: int | None = None`) or, without one, the default's type; where a
    string is allowed anything else is kept as its text (MODEL=123 is a name, not a number)."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    kinds = list(getattr(annotation, "__args__", (annotation,))) if annotation else [type(default)]
    if value is None and type(None) in kinds:
        return None
    if isinstance(value, float) and not math.isfinite(value):  # 1e400 parses as inf
        raise UserError(f"{name}={raw!r} is not a finite number")
    for kind in kinds:
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind in (int, float):
            ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(
                value, bool)
        elif kind in (list, tuple):
            ok = isinstance(value, (list, tuple))
        else:
            ok = kind is not type(None) and isinstance(value, kind)
        if ok:
            return kind(value) if kind in (float, list, tuple) else value
    if str in kinds:
        return raw
    want = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    raise UserError(f"{name}={raw!r}: expected {want}, like the default {default!r}")


def configure(namespace: dict, argv: list[str]) -> types.SimpleNamespace:
    """Resolve a script's knobs with `NAME=value` overrides; print and return them.

    `namespace` is the script's `globals()`; the module itself is not modified. Recipe constants
    (`_NAME`) are not overridable: an override names the line to edit instead.
    """
    cfg = knobs(namespace)
    annotations = namespace.get("__annotations__", {})
    for k, v in cfg.items():
        if v is None and k not in annotations:  # a programming error, caught by the tests
            raise TypeError(f"knob {k} defaults to None and needs an annotation (X: int | None)")
    given = set()
    for arg in argv:
        name, sep, raw = arg.partition("=")
        if name in given:
            twice = " ".join(a for a in argv if a.startswith(name + "="))
            print0(f"warning: {name} is given more than once ({twice}); the last counts")
        given.add(name)
        if not sep or not name:
            raise UserError(f"arguments are NAME=value overrides, got {arg!r}; "
                            f"valid names: {', '.join(cfg)}")
        if name not in cfg:
            hint = (f"; {name} is a recipe constant: edit _{name} in the script"
                    if f"_{name}" in namespace else "")
            raise UserError(f"unknown constant {name!r}{hint}; valid names: {', '.join(cfg)}")
        cfg[name] = _parse_value(name, raw, knobs(namespace)[name], annotations.get(name))
    width = max(len(k) for k in cfg)
    print0("config:")
    for k, v in cfg.items():
        print0(f"  {k:<{width}} = {v!r}")
    return types.SimpleNamespace(**cfg)


def at_least(cfg, minimum: int, *names: str):
    """Each named integer knob is at least `minimum`, or a UserError naming it."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise UserError(f"{name} must be at least {minimum}, got {getattr(cfg, name)}")


# ----------------------------------------------------------------------------------------------
# Architecture families: the only place that knows module names.

@dataclasses.dataclass(frozen=True)
class Family:
    """Where the parts of one decoder block live, relative to `model.model.layers[i]`."""
    post_norm: bool   # Olmo 2/3: norms on each sub-layer's output; False: pre-norm (Llama)
    attn_norm: str    # the norm whose output scores hidden channels for the attention block
    mlp_norm: str     # the same for the MLP block
    qk_norm: bool     # q_norm / k_norm over the whole projection (Olmo 2/3)


OLMO = Family(post_norm=True, attn_norm="post_attention_layernorm",
              mlp_norm="post_feedforward_layernorm", qk_norm=True)
LLAMA = Family(post_norm=False, attn_norm="input_layernorm",
               mlp_norm="post_attention_layernorm", qk_norm=False)
FAMILIES = {"olmo3": OLMO, "olmo2": OLMO, "llama": LLAMA, "qwen2": LLAMA, "mistral": LLAMA}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "num_hidden_layers", "head_dim")


def family_of(config, constant: str = "MODEL") -> Family:
    """The Family of a transformers config, or a UserError naming the supported ones."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise UserError(f"unsupported architecture {config.model_type!r} "
                        f"({', '.join(getattr(config, 'architectures', None) or [])}); "
                        f"{constant} must be one of: {', '.join(FAMILIES)}")
    return family


def check_positions(config, seq_len: int, model_knob: str = "MODEL"):
    """SEQ_LEN within the positions the model was trained for (`max_position_embeddings`, which
    counts RoPE scaling such as Olmo 3's YaRN), or a UserError before any weights load."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UserError(f"SEQ_LEN={seq_len} is more than the {limit} positions {model_knob}'s "
                        f"config allows (max_position_embeddings); lower SEQ_LEN")


def head_dim(config) -> int:
    """Per-head width; Olmo3Config has no declared field, the modeling code falls back like this."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shape_of(config) -> dict:
    """The sizes Pare prunes, as recorded in scores files and checkpoint records."""
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "num_hidden_layers": config.num_hidden_layers, "head_dim": head_dim(config)}


def stored_dtype(config, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (`fallback` when its config does not say)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else fallback


def layer_types(config) -> list[str]:
    """Per-layer attention type ('sliding_attention' / 'full_attention'); all full if undeclared."""
    types_ = getattr(config, "layer_types", None)
    return list(types_) if types_ else ["full_attention"] * config.num_hidden_layers


def param_count(shape: dict, config) -> dict:
    """Exact parameters of a dense Llama/Olmo-style decoder of `shape` (a `shape_of` dict; norms
    and biases in): {"total", "non_embedding"}. `config` supplies vocabulary, ties and biases."""
    h, f, n, hd = (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                   shape["head_dim"])
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    attn = h * (2 * q + 2 * kv)
    if family_of(config).qk_norm:
        attn += q + kv
    if getattr(config, "attention_bias", config.model_type == "qwen2"):
        attn += q + 2 * kv + (h if config.model_type != "qwen2" else 0)
    mlp = 3 * h * f + (f * 2 + h if getattr(config, "mlp_bias", False) else 0)
    layer = attn + mlp + 2 * h
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    total = n * layer + embed + h
    return {"total": total, "non_embedding": total - embed}


# ----------------------------------------------------------------------------------------------
# Devices and dtypes

def pick_device(device: str | None) -> str:
    """`device` checked (DEVICE), else cuda when available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise UserError(f"DEVICE={device!r} is not a torch device; use 'cpu', 'cuda' or "
                        f"None (cuda when available)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"DEVICE={device!r} but torch sees no GPU here; use DEVICE='cpu' or None")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"DEVICE={device!r}: Pare runs on 'cpu' or 'cuda'")
    return device


def pick_dtype(dtype: str | None, device: str, constant: str = "_DTYPE") -> torch.dtype:
    """`dtype` by name; by default bfloat16 on GPU and float32 on CPU (bf16 is ~5x slower there)."""
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise UserError(f"{constant}={dtype!r} is not a torch dtype (try 'bfloat16' or 'float32')")
    return getattr(torch, dtype)


# ----------------------------------------------------------------------------------------------
# Model names: a local directory or a hub id, checked before anything slow happens

def _hub_endpoint() -> tuple[str, int]:
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


_HUB_REACHABLE: dict = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connect within `timeout` s (once per process): without this
    check an unreachable hub costs ~30 s of retries per file before it fails."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if "ok" not in _HUB_REACHABLE:
        try:
            socket.create_connection(_hub_endpoint(), timeout=timeout).close()
            _HUB_REACHABLE["ok"] = True
        except OSError:
            _HUB_REACHABLE["ok"] = False
    return _HUB_REACHABLE["ok"]


def model_files(name: str) -> Path | None:
    """The local directory holding `name`'s files: the directory itself, or the hub cache's
    snapshot of a hub id (None when it is not cached)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import try_to_load_from_cache
    try:
        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub would refuse (e.g. two slashes) is simply not cached
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def check_model(name: str, constant: str) -> str:
    """`name` (the value of `constant`) is a model directory, or a hub id that is cached or can
    be downloaded now; anything else is one UserError that says which and what to do."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{constant}={name!r} must name a model directory or a hub id")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{constant}={name!r} is a directory without config.json: not a "
                            f"Hugging Face model directory")
        return str(p)
    if p.exists():
        raise UserError(f"{constant}={name!r} is a file; it must be a model directory or hub id")
    parts = name.split("/")
    local = (name.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts)
             or (p.parent != Path(".") and p.parent.is_dir()))
    if local:
        raise UserError(f"{constant}={name!r}: no such directory (and not a hub id of the form "
                        f"'org/name')")
    if model_files(name) is not None:
        return name
    if not hub_reachable():
        raise UserError(f"{constant}={name!r} is neither a local directory nor a hub model in the "
                        f"local cache, and the hub cannot be reached from here (offline, or "
                        f"HF_HUB_OFFLINE=1); set {constant} to a local directory")
    return name


def load_config(name: str, constant: str = "MODEL"):
    """The model's config (cheap: no weights), or a UserError naming `constant`."""
    from transformers import AutoConfig
    check_model(name, constant)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise UserError(f"{constant}={name!r} needs code shipped with the model "
                            f"(trust_remote_code), which Pare does not run; supported "
                            f"architectures: {', '.join(FAMILIES)}") from None
        raise UserError(f"cannot load a model config from {constant}={name!r}: "
                        f"{' '.join(text.split())[:300]}") from None


def load_tokenizer(name: str, constant: str = "MODEL"):
    """The tokenizer of a hub id or local directory, or a UserError naming `constant`."""
    from transformers import AutoTokenizer
    check_model(name, constant)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        files = model_files(name)
        there = (f"; files there: {', '.join(sorted(p.name for p in files.iterdir()))[:200]}"
                 if files else "")
        raise UserError(f"cannot load a tokenizer from {constant}={name!r} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]}){there}") from None


def load_model(name: str, device: str, dtype: torch.dtype, constant: str = "MODEL"):
    """Load a causal LM in eval mode on `device`; spread over GPUs when it does not fit one."""
    from transformers import AutoModelForCausalLM
    config = load_config(name, constant)
    placement = {"device_map": device}
    if device == "cuda" and torch.cuda.device_count() > 1:
        need = param_count(shape_of(config), config)["total"] * torch.finfo(dtype).bits // 8
        if need > 0.8 * torch.cuda.mem_get_info(0)[0]:
            placement = {"device_map": "auto"}
            print0(f"model needs {need / 2**30:.1f} GiB, more than one GPU holds: device_map=auto")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **placement)
    except OSError as e:
        raise UserError(f"cannot load the weights of {constant}={name!r}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    return model.eval()


def input_device(model) -> torch.device:
    """Where input ids must go (the embedding's device, also under device_map='auto')."""
    return model.get_input_embeddings().weight.device


# ----------------------------------------------------------------------------------------------
# Model identity by content: config and weight files, not the path they happen to be at

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_SAMPLES, _BLOCK = 32, 1 << 16  # blocks of each weight file hashed: 2 MiB read per file


def check_safetensors(path: Path, size: int):
    """A safetensors file whose header or length is wrong (truncated, corrupt): a UserError."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n < size else None
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a readable safetensors file (corrupt header); "
                        f"re-save or re-download the model")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise UserError(f"{path} is truncated or corrupt ({size} bytes, its header says "
                        f"{8 + n + end}); re-save or re-download the model")


def fingerprint(name: str, constant: str = "MODEL") -> str:
    """A cheap content hash of a local model: config.json, and each weight file's name, size
    and `_SAMPLES` evenly spaced blocks. The same model moved or copied keeps it; other weights
    saved at the same path change it. Also checks that safetensors files are complete. A hub id
    is its name and cached revision (the commit the files came from: the same before and after
    its weights are downloaded), or its name alone when nothing of it is cached."""
    root = model_files(name)
    if root is None:
        return f"hub:{name}"
    if not Path(name).is_dir():  # a hub cache snapshot: .../snapshots/<commit>
        return f"hub:{name}@{root.name}"
    h = hashlib.sha256((root / "config.json").read_bytes())
    for path in sorted(p for p in root.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            check_safetensors(path, size)
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for k in range(_SAMPLES):
                f.seek(k * max(size - _BLOCK, 0) // max(_SAMPLES - 1, 1))
                h.update(f.read(_BLOCK))
    return "sha256:" + h.hexdigest()[:32]


def data_fingerprint(dataset: str) -> str | None:
    """A cheap content hash of a local DATASET file (its size and `_SAMPLES` evenly spaced
    blocks), so that a resume or a cache notices the file was edited; None for a hub dataset."""
    path = Path(dataset).expanduser()
    if not path.is_file():
        return None
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(_SAMPLES):
            f.seek(k * max(size - _BLOCK, 0) // max(_SAMPLES - 1, 1))
            h.update(f.read(_BLOCK))
    return "sha256:" + h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Outputs that never destroy a user's data

RECORD = "pare.json"  # the human-readable record next to the weights (prune.py, distill.py)


def _relation(out: Path, other: Path) -> str | None:
    """How resolved path `out` sits relative to resolved `other`: the same, inside, above."""
    if out == other:
        return "the same path as"
    if other in out.parents:
        return "inside"
    if out in other.parents:
        return "a parent of"
    return None


def claim(target: Path, constant: str):
    """Lock output `target` for this process (a lock on the hidden sibling `.NAME.lock`, released
    when the script ends or dies) so that two runs never write it at once; a UserError when
    another run holds it. Only under common.run: in-process calls (tests, benchmarks) skip it."""
    import fcntl
    if _claims is None or target in _claims or not target.parent.is_dir():
        return
    lock = target.with_name(f".{target.name}.lock")
    try:
        f = open(lock, "a+")
    except OSError:  # a read-only place: no run can write there either
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{constant}={str(target)!r} is being written by another run (process "
                        f"{holder}); wait for it to end or choose another {constant}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _claims[target] = f


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of `path` named after this process (`.NAME.tmp-PID`)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_stale(path: Path):
    """Tidy after earlier runs that were killed (their process is gone): a new output they left
    half written is removed; a previous output they had moved aside to swap in a new one and
    never replaced is put back (never deleted)."""
    for stale in sorted(path.parent.glob(f".{path.name}.*-*")):
        tag, _, pid = stale.name.rpartition("-")
        if not (tag.endswith((".tmp", ".old")) and pid.isdigit() and not _alive(int(pid))):
            continue
        if tag.endswith(".old") and not path.exists():
            os.replace(stale, path)
            print0(f"note: {path} was left aside by a run that was killed while swapping it; "
                   f"put back")
        else:
            remove(stale)


def check_output(path: str, constant: str, inputs: dict, is_previous, may_read_only: bool = False
                 ) -> Path:
    """`path` (the value of `constant`) is safe to write, or a UserError before any work.

    Safe: new, or an empty directory, or a previous output of the same script (`is_previous(p)`
    says so from its record); never a symbolic link, a file system root, or the same as, inside
    or above any input in `inputs` ({constant: path}; names that are not local paths, such as hub
    ids, are skipped), and its nearest existing parent must be a writable directory (unless
    `may_read_only` and it is an existing directory the run may only read, such as a complete
    teacher cache; a write there still fails with one line).
    """
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{constant}={path!r} must be a path")
    p = Path(path).expanduser()
    if p.is_symlink():
        raise UserError(f"{constant}={path!r} is a symbolic link; give the path it points to, "
                        f"or a new one")
    target = p.resolve()
    if target == Path(target.anchor) or target == Path.home():
        raise UserError(f"{constant}={path!r} resolves to {target}: give a new directory")
    for name, value in inputs.items():
        if not value or not Path(str(value)).expanduser().exists():
            continue
        how = _relation(target, Path(str(value)).expanduser().resolve())
        if how:
            raise UserError(f"{constant}={path!r} is {how} {name}={value!r}; writing there "
                            f"could destroy an input: choose another {constant}")
    if is_first_process():
        if not may_read_only:  # a cache several runs read is not one run's to lock
            claim(target, constant)
        clean_stale(target)  # a previous output a killed run left aside is back before anything
    if p.exists():
        empty = p.is_dir() and not any(p.iterdir())
        if not empty and not is_previous(p):
            raise UserError(f"{constant}={path!r} exists and is not a previous output of this "
                            f"script (Pare only replaces its own outputs); choose a new path or "
                            f"move it away yourself")
    if may_read_only and p.is_dir():  # e.g. a complete teacher cache: read, maybe never written
        return p
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{constant}={path!r} is not writable ({parent} is not a writable "
                        f"directory)")
    return p


def read_json(path: Path, what: str, required: tuple = (), stage: str | None = None,
              fix: str = "") -> dict:
    """The JSON object in file `path` (`what` it is, for messages), or one UserError naming the
    file: not JSON, not an object, not of `stage` (its "stage" key), or lacking a `required`
    key. `fix` ends the message (what the user should do, e.g. "delete DIR to start again")."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable {what} ({' '.join(str(e).split())[:150]})"
                        f"{tail}") from None
    if not isinstance(data, dict) or (stage is not None and data.get("stage") != stage):
        raise UserError(f"{path} is not a {what}{tail}")
    missing = [k for k in required if k not in data]
    if missing:
        raise UserError(f"{path} is not a {what} of this version of Pare (lacks {missing}){tail}")
    return data


def changed_settings(saved: dict, now: dict, ignore=()) -> dict:
    """{name: (saved value, value now)} of the settings in `now` that differ from `saved`
    (those in `ignore` may change)."""
    return {k: (saved.get(k), v) for k, v in now.items() if k not in ignore and saved.get(k) != v}


def recorded_name(name: str) -> str:
    """How a model or file is recorded in an artefact: a local path resolved (so that the next
    stage finds it from any directory), a hub id as it is."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def is_record_of(path: Path, stage: str) -> bool:
    """Whether directory `path` holds Pare's record of `stage` (a previous output of it)."""
    try:
        return json.loads((path / RECORD).read_text()).get("stage") == stage
    except (OSError, ValueError, AttributeError):
        return False


def _disk_full(path: Path, e: BaseException) -> bool:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        return True
    try:
        parent = next(p for p in (path, *path.parents) if p.exists())
        usage = shutil.disk_usage(parent)
        return usage.free < max(64 << 20, usage.total // 200)
    except (StopIteration, OSError):
        return False


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write of `path` into one UserError naming it (and a full disk when that is
    the cause). torch reports write failures as RuntimeError, safetensors as SafetensorError."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        text = " ".join(str(e).split())
        if isinstance(e, RuntimeError) and not any(
                s in text for s in ("inline_container", "file write failed", "PytorchStreamWriter",
                                    "No space left", "errno")):
            raise
        if _disk_full(Path(path), e):
            why = "the disk holding it is full"
        elif isinstance(e, RuntimeError):  # torch says only "unexpected pos" or the like
            why = f"the write stopped part-way (a full disk or a file size limit?): {text[:120]}"
        else:
            why = getattr(e, "strerror", None) or text[:200]
        raise UserError(f"cannot write {path}: {why}") from None


def write_atomic(path: Path, write, is_previous=lambda p: True):
    """Write `path` (file or directory) through `write(tmp)`, then swap it in whole: a crash,
    a full disk or Ctrl-C leaves the old `path` as it was and no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp, old = temp_sibling(path), temp_sibling(path, "old")
    try:
        with writing(path):
            write(tmp)
        if path.exists():
            if not is_previous(path):  # checked before the work; checked again before replacing
                raise UserError(f"{path} appeared while this run worked and is not Pare's output; "
                                f"it is left alone")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if old.exists() and not path.exists():  # stopped between the two renames: put it back
            os.replace(old, path)
        remove(tmp)
        remove(old)
    return path


# ----------------------------------------------------------------------------------------------
# Calibration data: documents -> rendered text -> tokens -> packed rows of seq_len

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def record_problem(doc) -> str | None:
    """Why `doc` (a record of DATASET) cannot be rendered, or None: it needs `messages`, a
    non-empty list of turns each with a string `role` (its `content` is the chat template's
    business), or else a string `text`."""
    if isinstance(doc, str):
        return None
    if doc.get("messages") is not None or "text" not in doc:
        turns = doc.get("messages")
        if "messages" not in doc:
            return f"it has no 'messages' or 'text' column (it has {sorted(doc)})"
        if not isinstance(turns, list) or not turns:
            return f"its 'messages' is {str(turns)[:80]!r}, not a list of turns"
        for t in turns:  # content: text, None (tool calls) or a list of parts: the template's
            if not (isinstance(t, dict) and isinstance(t.get("role"), str)
                    and isinstance(t.get("content", ""), (str, list, type(None)))):
                return f"a turn {str(t)[:80]!r} is not {{'role': str, 'content': ...}}"
        return None
    if not isinstance(doc["text"], str):
        return f"its 'text' is {repr(doc['text'])[:80]}, not a string"
    return None
    return f"it has no 'messages' or 'text' column (it has {sorted(doc)})"


def _check_records(records: list, where: str, unit: str, first: int):
    """Every record of a local file can be rendered, checked before any model loads (a bad one
    deep in the file would otherwise stop a run hours in)."""
    for i, doc in enumerate(records):
        why = record_problem(doc)
        if why:
            raise UserError(f"{where}: {unit} {i + first} cannot be used: {why}; fix or drop it")


def _documents_from_file(path: Path):
    """Documents of a local file: .txt (blank-line separated), .jsonl or .parquet records
    (every record checked, see `record_problem`)."""
    where = f"DATASET={str(path)!r}"
    if path.suffix in (".txt", ".jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where} is not UTF-8 text (byte {e.start}); convert it to "
                            f"UTF-8") from None
        if path.suffix == ".txt":
            return [d.strip() for d in text.split("\n\n") if d.strip()]
        records = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: line {i + 1} is not JSON ({e})") from None
                if not isinstance(records[-1], dict):
                    raise UserError(f"{where}: line {i + 1} is not a JSON object")
                why = record_problem(records[-1])
                if why:
                    raise UserError(f"{where}: line {i + 1} cannot be used: {why}; fix or drop it")
        return records
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{where} is not a readable parquet file ({' '.join(str(e).split())[:200]})"
                        ) from None
    _check_records(records, where, "row", 0)
    return records


def _documents_from_hub(name: str, seed: int, skip: int = 0):
    """Stream a hub dataset (never downloaded whole), shuffled deterministically by `seed`, from
    its `skip`-th document (the skipped ones are read, not rendered or tokenized)."""
    from datasets import load_dataset
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline and not hub_reachable():
        raise UserError(f"cannot load dataset DATASET={name!r}: the hub cannot be reached from "
                        f"here; set DATASET to a local .txt, .jsonl or .parquet file")
    try:
        stream = load_dataset(name, split="train", streaming=True)
    except Exception as e:  # datasets raises many types (offline, missing, gated): all mean the same
        raise UserError(f"cannot load dataset DATASET={name!r} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); offline, set DATASET to a local .txt, "
                        f".jsonl or .parquet file") from None
    stream = stream.shuffle(seed=seed, buffer_size=10_000)
    return stream.skip(skip) if skip else stream


def render(doc, tokenizer, model_knob: str = "MODEL") -> str:
    """One document as text: chat `messages` through the chat template, or a `text` field
    (`model_knob`: the knob that named the tokenizer's model, for messages)."""
    why = record_problem(doc)
    if why:
        raise UserError(f"DATASET has a record that cannot be used: {why}")
    if isinstance(doc, str):
        return doc
    if doc.get("messages") is None:
        return doc["text"]
    if not tokenizer.chat_template:
        raise UserError(f"DATASET has a 'messages' column but {model_knob}'s tokenizer has no "
                        f"chat template; use a dataset with a 'text' column")
    try:
        return tokenizer.apply_chat_template(doc["messages"], tokenize=False)
    except Exception as e:  # jinja's errors, or the template's own raise_exception
        raise UserError(f"{model_knob}'s chat template cannot render a DATASET record "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); the record "
                        f"begins {str(doc['messages'])[:80]!r}") from None


def documents(dataset: str, seed: int, skip: int = 0):
    """The documents of DATASET: a local file shuffled with `seed`, or a hub dataset streamed;
    the first `skip` of them left out."""
    if not isinstance(dataset, str) or not dataset:
        raise UserError(f"DATASET={dataset!r} must name a local file or a hub dataset")
    path = Path(dataset)
    if path.is_dir():
        raise UserError(f"DATASET={dataset!r} is a directory; give a {', '.join(LOCAL_SUFFIXES)} "
                        f"file or a hub dataset id")
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"DATASET={dataset!r}: no such file")
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"DATASET={dataset!r}: local files must be {', '.join(LOCAL_SUFFIXES)}")
        docs = _documents_from_file(path)
        random.Random(seed).shuffle(docs)
        return docs[skip:]
    return _documents_from_hub(dataset, seed, skip)


def packed_rows(dataset: str, tokenizer, seq_len: int, seed: int, position: dict | None = None,
                model_knob: str = "MODEL"):
    """Yield rows of `seq_len` token ids one at a time: each document rendered, tokenized
    without added special tokens and followed by EOS, documents concatenated and cut into rows
    (packing measurably helps calibration, Minitron P1).

    `position`, when given, is {"documents": n, "carry": [token ids]}: start after the first n
    documents with those tokens already in the packing buffer. It is updated in place before
    each row is yielded, so a copy taken after any row resumes the stream right after that row
    without re-reading or re-tokenizing what came before ({"documents": 0, "carry": []}: the start).
    `model_knob`: the knob that named the tokenizer's model, for messages.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"{model_knob}'s tokenizer has no eos token to separate packed documents")
    position = {"documents": 0, "carry": []} if position is None else position
    buf: list[int] = list(position["carry"])
    docs = iter(documents(dataset, seed, skip=position["documents"]))
    while True:
        while len(buf) >= seq_len:  # the carry alone may hold rows (the end of a long document)
            row = torch.tensor(buf[:seq_len], dtype=torch.long)
            del buf[:seq_len]
            position["carry"] = list(buf)
            yield row
        doc = next(docs, None)
        if doc is None:
            return
        buf.extend(tokenizer(render(doc, tokenizer, model_knob), add_special_tokens=False)["input_ids"])
        buf.append(eos)
        position["documents"] += 1


def calibration_rows(dataset: str, tokenizer, num_rows: int, seq_len: int, seed: int,
                     skip_rows: int = 0, position: dict | None = None,
                     model_knob: str = "MODEL") -> torch.Tensor:
    """`num_rows` rows of exactly `seq_len` token ids (`packed_rows` after its first `skip_rows`),
    deterministic; fewer when the data runs out, but at least one. `position`: packed_rows'
    (from the start), left where the last row was cut."""
    stream = packed_rows(dataset, tokenizer, seq_len, seed, position, model_knob)
    rows = list(itertools.islice(stream, skip_rows, skip_rows + num_rows))
    if not rows:
        after = f" after the first {skip_rows} rows" if skip_rows else ""
        raise UserError(f"DATASET={dataset!r} yields fewer than one row of SEQ_LEN={seq_len} "
                        f"tokens{after}; use more data or a smaller SEQ_LEN")
    return torch.stack(rows)


def start_position() -> dict:
    """Where `row_stream` begins: epoch 0, no rows, documents or carried tokens yet."""
    return {"epoch": 0, "row": 0, "documents": 0, "carry": []}


def row_stream(dataset: str, tokenizer, seq_len: int, seed: int, held_out: int, position: dict,
               model_knob: str = "STUDENT"):
    """Training rows forever: DATASET's packed rows after the first `held_out`, in the same order
    again when the data runs out. Begins at `position` and keeps it up to date in place (epoch,
    rows of this epoch, and packed_rows' documents read and carried tokens), so a copy saved
    after any row resumes right after it without re-reading the data before it."""
    while True:
        for row in packed_rows(dataset, tokenizer, seq_len, seed, position, model_knob):
            position["row"] += 1
            if position["row"] > held_out:
                yield row
        if position["row"] <= held_out:
            raise UserError(f"DATASET={dataset!r} has no rows of SEQ_LEN={seq_len} tokens "
                            f"left after the {held_out} held-out rows; use more data, "
                            f"a smaller SEQ_LEN or fewer EVAL_SAMPLES")
        print0(f"data: DATASET has {position['row'] - held_out} training rows of "
               f"{seq_len} tokens; repeating it (epoch {position['epoch'] + 2})")
        position.update(start_position(), epoch=position["epoch"] + 1)


def batches(rows: torch.Tensor, batch_size: int):
    """Consecutive slices of `rows`, `batch_size` at a time (the last may be smaller)."""
    for i in range(0, len(rows), batch_size):
        yield rows[i:i + batch_size]


# ----------------------------------------------------------------------------------------------
# Held-out metrics computed in token chunks (a 100k vocabulary makes full logits the memory peak)

def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states for `ids`, without applying lm_head."""
    return model.model(input_ids=ids.to(input_device(model)), use_cache=False).last_hidden_state


def log_probs(head, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of hidden states [N, H] through `head` (an lm_head module or
    function), in float32 (float64 for float64 inputs)."""
    return head(hidden).to(torch.promote_types(hidden.dtype, torch.float32)).log_softmax(-1)


def chunked_log_probs(head, hidden: torch.Tensor, chunk_tokens: int):
    """(start, log_probs) of `hidden`'s tokens `chunk_tokens` at a time, so that
    full-vocabulary logits exist for one chunk only: the one pass over lm_head of every
    held-out metric and of the teacher cache."""
    for i in range(0, len(hidden), chunk_tokens):
        yield i, log_probs(head, hidden[i:i + chunk_tokens])


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
    rest mass (derivative of the rest bucket's term). Used by distill.py's loss and `evaluate`.
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


def hidden_loss(model, hidden: torch.Tensor, ids: torch.Tensor, chunk_tokens: int = 4096) -> float:
    """Summed next-token cross-entropy of `model`'s lm_head on final hidden states `hidden`
    ([B * (T - 1), H], the predictions for ids[:, 1:]), chunked."""
    labels = ids[:, 1:].flatten().to(hidden.device)
    total = 0.0
    for i, ls in chunked_log_probs(model.lm_head, hidden, chunk_tokens):
        total -= ls.gather(1, labels[i:i + chunk_tokens, None]).sum().item()
    return total


def lm_loss(model, ids: torch.Tensor, chunk_tokens: int = 4096) -> tuple[float, int]:
    """Summed next-token cross-entropy (float32) and token count for rows `ids`, chunked."""
    hidden = final_hidden(model, ids)[:, :-1].flatten(0, 1)
    return hidden_loss(model, hidden, ids, chunk_tokens), hidden.shape[0]


@torch.no_grad()
@contextlib.contextmanager
def skipping(model, skip=()):
    """Within this block the decoder layers in `skip` act as the identity: a forward hook returns
    the block's input as its output, so the model is never edited (layer indices, layer_types
    and the KV cache stay consistent)."""
    def identity(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        return (h_in, *out[1:]) if isinstance(out, tuple) else h_in

    handles = [model.model.layers[i].register_forward_hook(identity, with_kwargs=True)
               for i in skip]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def skip_loss(model, rows: torch.Tensor, batch_size: int, skip=()) -> float:
    """Mean LM loss on `rows` with the decoder layers in `skip` replaced by the identity."""
    total = count = 0
    with skipping(model, skip):
        for ids in batches(rows, batch_size):
            s, c = lm_loss(model, ids)
            total, count = total + s, count + c
    return total / count


@torch.no_grad()
def final_hiddens(model, rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`final_hidden` of each batch of `rows`: a teacher's, computed once for many students."""
    return [final_hidden(model, ids) for ids in batches(rows, batch_size)]


def teacher_terms(teacher, ht, cached: dict | None, span: slice, labels, ls) -> tuple:
    """(summed KL(teacher || student), summed teacher NLL) of one chunk of tokens: against the
    live teacher's final hidden states `ht`, or a teacher cache's top-k targets `cached`
    (flattened over the batch's tokens; the KL over k + 1 buckets, see `topk_kl`)."""
    if cached is not None:
        t = {k: v[span].to(ls.device) for k, v in cached.items()}
        return topk_kl(ls, t["ids"], t["logp"], t["rest"])[0].item(), -t["target"].double().sum().item()
    lt = log_probs(teacher.lm_head, ht[span]).to(ls.device)
    nll = -lt.gather(1, labels.to(lt.device)[:, None]).sum().item()
    return (lt.exp() * (lt - ls)).sum().item(), nll


@torch.no_grad()
def evaluate(student, rows: torch.Tensor, batch_size: int, teacher=None,
             chunk_tokens: int = 2048, teacher_hidden: list[torch.Tensor] | None = None,
             progress: str | None = None, cached: dict | None = None) -> dict:
    """Held-out metrics on `rows`: student (and teacher) perplexity, KL(teacher || student).

    Perplexity is exp(mean next-token NLL); KL is the mean over predicted tokens, temperature 1,
    in nats. Logits exist only `chunk_tokens` at a time, in float32. The teacher is a model, or
    `cached`: a teacher cache's targets for `rows` (distill.py's TEACHER_CACHE; its KL is over the
    top k plus the rest, a lower bound of the full KL). `teacher_hidden`, from
    `final_hiddens(teacher, rows, batch_size)`, saves running the teacher again. `progress`:
    the label of a progress bar over the batches (None: no bar).
    """
    nll_s = nll_t = kl = 0.0
    count = 0
    with_teacher = teacher is not None or cached is not None
    n_batches = math.ceil(len(rows) / batch_size)
    for b, ids in enumerate(tqdm(batches(rows, batch_size), total=n_batches, desc=progress,
                                 disable=progress is None or not is_first_process(), leave=False)):
        hs = final_hidden(student, ids)[:, :-1].flatten(0, 1)
        ht = t_rows = None
        if cached is not None:
            t_rows = {k: v[b * batch_size:b * batch_size + len(ids)].flatten(0, 1)
                      for k, v in cached.items()}
        elif teacher is not None:
            ht = teacher_hidden[b] if teacher_hidden is not None else final_hidden(teacher, ids)
            ht = ht[:, :-1].flatten(0, 1)
        labels = ids[:, 1:].flatten()
        for i, ls in chunked_log_probs(student.lm_head, hs, chunk_tokens):
            span = slice(i, i + chunk_tokens)
            y = labels[span].to(ls.device)
            nll_s -= ls.gather(1, y[:, None]).sum().item()
            if with_teacher:
                k, n = teacher_terms(teacher, ht, t_rows, span, y, ls)
                kl, nll_t = kl + k, nll_t + n
        count += len(labels)
    out = {"student_ppl": math.exp(nll_s / count), "tokens": count}
    if with_teacher:
        out.update(teacher_ppl=math.exp(nll_t / count), kl=kl / count)
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints: an ordinary Hugging Face directory plus Pare's record, written atomically

def legacy_rope(config) -> dict:
    """`rope_theta` and a flat `rope_scaling` (of the full-attention layers), read the same way
    by transformers 4.57 (which ignores the nested `rope_parameters` of 5.x) and >= 5.13."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    if "rope_theta" not in params:
        return {}
    theta = params.pop("rope_theta")
    scaling = params if params.get("rope_type", "default") != "default" else None
    return {"rope_theta": theta, "rope_scaling": scaling}


OWN_EXTRAS = ("latency.png", "selection.json", "progress.png")  # what Pare adds next to a checkpoint it wrote


def keep_foreign_files(old: Path, new: Path):
    """Copy into `new` the files of the previous output `old` that Pare did not write (those not
    in its record's "files" list, e.g. a user's notes or evaluation results), so that replacing
    an output never deletes them."""
    if not old.is_dir():
        return
    try:
        ours = set(json.loads((old / RECORD).read_text()).get("files") or [])
    except (OSError, ValueError, AttributeError):
        return
    if not ours:
        return  # written before Pare listed its files
    foreign = sorted(p for p in old.iterdir() if p.name not in ours and p.name not in OWN_EXTRAS
                     and not (new / p.name).exists())
    for p in foreign:
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, new / p.name)
    if foreign:
        print0(f"note: {old} held {len(foreign)} file(s) Pare did not write, kept in the new "
               f"output: {', '.join(p.name for p in foreign)}")


def write_checkpoint(model, source: str, out_dir, record: dict, dtype: torch.dtype | None = None,
                     ) -> Path:
    """Save `model` as an HF directory at `out_dir`, atomically, with Pare's `record` (whose
    "stage" says which script wrote it: only such a directory is ever replaced).

    The config gets an explicit head_dim, the layer_types of its layers and the legacy RoPE keys
    next to the nested 5.x ones (see `legacy_rope`); tokenizer files (chat template included) and
    generation_config.json come from `source` (hub id or directory). Weights in `dtype` (None:
    as they are).
    """
    from transformers import GenerationConfig
    config = model.config
    config.head_dim = head_dim(config)  # Olmo3Config has no such field: write it explicitly
    tokenizer = load_tokenizer(source, "the tokenizer source")
    if dtype is not None:
        model.to(dtype)

    def write(tmp: Path):
        model.save_pretrained(tmp)
        config_json = json.loads((tmp / "config.json").read_text())
        config_json.update(legacy_rope(config))  # after save: transformers' setters rewrite these
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(source).save_pretrained(tmp)
        except OSError:
            print0(f"warning: {source} has no generation_config.json; none written")
        files = sorted([p.name for p in tmp.iterdir()] + [RECORD])
        (tmp / RECORD).write_text(json.dumps({**record, "files": files}, indent=2, default=str)
                                  + "\n")
        keep_foreign_files(Path(out_dir), tmp)

    return write_atomic(Path(out_dir), write, lambda p: is_record_of(p, record["stage"]))


def read_record(model_dir: str, required: tuple = (), constant: str = "STUDENT") -> dict | None:
    """Pare's record of a checkpoint directory (None if it has none); a UserError naming the file
    when it is not JSON or lacks a `required` key."""
    path = Path(model_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} ({constant}'s record) is not JSON: {e}") from None
    missing = [k for k in required if k not in record]
    if missing:
        raise UserError(f"{path} ({constant}'s record) lacks {missing}; it was written by another "
                        f"version of Pare: prune again")
    return record


def lineage(model: str, shape: dict, model_id: str, constant: str) -> list[dict]:
    """`model`'s ancestors back to the original model, oldest first, then `model` itself: each
    {"model", "stage" (the Pare stage that wrote it; "original" if none), "shape", "fingerprint"}.
    A model Pare did not write (or a hub id) begins a new lineage."""
    record = read_record(model, constant=constant) if Path(model).is_dir() else None
    ancestors = list((record or {}).get("lineage") or [])
    return ancestors + [{"model": model, "stage": (record or {}).get("stage", "original"),
                         "shape": shape, "fingerprint": model_id}]


def versions() -> dict:
    """Versions of the packages that shape the numbers, for every artefact's record."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
