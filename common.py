"""Infrastructure shared by Pare's three scripts: overrides, errors, loading, data, small helpers.

Nothing here is part of the algorithm; each script keeps its own maths. What lives here:

- `configure(namespace, argv)`: the one override mechanism. Every script's UPPER_CASE constants
  can be set for a single run as `uv run SCRIPT.py NAME=value ...`.
- `UserError` and `run(main)`: a bad input becomes one `error: ...` line and exit status 2.
- `FAMILIES` / `family_of(config)`: the small, explicit description of each supported
  architecture's module names (Olmo 3 and Olmo 2 post-norm blocks; pre-norm Llama-family).
- `load_tokenizer`, `load_config`, `load_model`: from a hub id or a local directory.
- `calibration_rows(...)`: documents from a hub dataset or a local file, rendered, packed;
  `packed_rows` streams the same rows with a resumable position.
- `lm_loss`, `skip_loss`, `evaluate`: held-out loss (also with layers skipped), perplexity and
  KL(teacher || student), computed in chunks of tokens so full-vocabulary logits never exist for
  a whole batch; `final_hiddens` keeps a teacher's outputs for comparing many students.
- `write_checkpoint`, `read_record`: an HF directory (weights, tokenizer, chat template,
  generation config) plus Pare's `pare.json` record, written atomically.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


# ----------------------------------------------------------------------------------------------
# Errors and the override mechanism

class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, nothing written."""


def run(main):
    """Call `main(sys.argv[1:])`; turn a UserError into one `error:` line and exit status 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def constants(namespace: dict) -> dict:
    """The UPPER_CASE configuration constants of a script's module namespace, in order."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and not callable(v)
            and not isinstance(v, types.ModuleType)}


def _parse_value(name: str, raw: str, default):
    """Parse one override: a Python literal where it is one, else the raw string; type-checked."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if default is None:
        return value
    if isinstance(default, str):
        return value if isinstance(value, str) else raw  # MODEL=123 is a name, not a number
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise UserError(f"{name}={raw!r}: expected a {type(default).__name__} "
                    f"like the default {default!r}")


def configure(namespace: dict, argv: list[str]) -> types.SimpleNamespace:
    """Resolve a script's constants with `NAME=value` overrides; print and return them.

    `namespace` is the script's `globals()`. The module itself is not modified: the returned
    namespace (`cfg.MODEL`, ...) is the resolved configuration for this run.
    """
    cfg = constants(namespace)
    for arg in argv:
        name, sep, raw = arg.partition("=")
        if not sep or not name:
            raise UserError(f"arguments are NAME=value overrides, got {arg!r}; "
                            f"valid names: {', '.join(cfg)}")
        if name not in cfg:
            raise UserError(f"unknown constant {name!r}; valid names: {', '.join(cfg)}")
        cfg[name] = _parse_value(name, raw, constants(namespace)[name])
    width = max(len(k) for k in cfg)
    print("config:")
    for k, v in cfg.items():
        print(f"  {k:<{width}} = {v!r}")
    return types.SimpleNamespace(**cfg)


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


def family_of(config) -> Family:
    """The Family of a transformers config, or a UserError naming the supported ones."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise UserError(f"unsupported architecture {config.model_type!r} "
                        f"({', '.join(getattr(config, 'architectures', None) or [])}); "
                        f"MODEL must be one of: {', '.join(FAMILIES)}")
    return family


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


# ----------------------------------------------------------------------------------------------
# Devices, dtypes, loading

def pick_device(device: str | None) -> str:
    """`device` as given, else cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: str) -> torch.dtype:
    """`dtype` by name; by default bfloat16 on GPU and float32 on CPU (bf16 is ~5x slower there)."""
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UserError(f"DTYPE={dtype!r} is not a torch dtype (try 'bfloat16' or 'float32')")
    return getattr(torch, dtype)


def load_config(name: str, trust_remote_code: bool = False):
    """The model's config (cheap: no weights), or a UserError naming MODEL."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from MODEL={name!r}: "
                        f"{str(e).splitlines()[0]}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a hub id or local directory, or a UserError naming MODEL."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from MODEL={name!r}: "
                        f"{str(e).splitlines()[0]}") from None


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


def load_model(name: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM in eval mode on `device`; spread over GPUs when it does not fit one."""
    from transformers import AutoModelForCausalLM
    config = load_config(name, trust_remote_code)
    placement = {"device_map": device}
    if device == "cuda" and torch.cuda.device_count() > 1:
        need = param_count(shape_of(config), config)["total"] * torch.finfo(dtype).bits // 8
        if need > 0.8 * torch.cuda.mem_get_info(0)[0]:
            placement = {"device_map": "auto"}
            print(f"model needs {need / 2**30:.1f} GiB, more than one GPU holds: device_map=auto")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype,
                                                 trust_remote_code=trust_remote_code, **placement)
    return model.eval()


def input_device(model) -> torch.device:
    """Where input ids must go (the embedding's device, also under device_map='auto')."""
    return model.get_input_embeddings().weight.device


# ----------------------------------------------------------------------------------------------
# Calibration data: documents -> rendered text -> tokens -> packed rows of seq_len

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _documents_from_file(path: Path):
    """Documents of a local file: .txt (blank-line separated), .jsonl or .parquet records."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"DATASET={str(path)!r}: line {i + 1} is not JSON ({e})") from None
        return records
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


def _documents_from_hub(name: str, seed: int, skip: int = 0):
    """Stream a hub dataset (never downloaded whole), shuffled deterministically by `seed`, from
    its `skip`-th document (the skipped ones are read, not rendered or tokenized)."""
    from datasets import load_dataset
    try:
        stream = load_dataset(name, split="train", streaming=True)
    except Exception as e:  # datasets raises many types (offline, missing, gated): all mean the same
        raise UserError(f"cannot load dataset DATASET={name!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); offline, set DATASET to a "
                        f"local .txt, .jsonl or .parquet file") from None
    stream = stream.shuffle(seed=seed, buffer_size=10_000)
    return stream.skip(skip) if skip else stream


def render(doc, tokenizer) -> str:
    """One document as text: chat `messages` through the chat template, or a `text` field."""
    if isinstance(doc, str):
        return doc
    if "messages" in doc:
        if not tokenizer.chat_template:
            raise UserError("DATASET has a 'messages' column but MODEL's tokenizer has no chat "
                            "template; use a dataset with a 'text' column")
        return tokenizer.apply_chat_template(doc["messages"], tokenize=False)
    if "text" in doc:
        return doc["text"]
    raise UserError(f"DATASET records need a 'messages' or 'text' column, got {sorted(doc)}")


def calibration_rows(dataset: str, tokenizer, num_rows: int, seq_len: int, seed: int,
                     ) -> torch.Tensor:
    """`num_rows` rows of exactly `seq_len` token ids, packed from documents, deterministic.

    Each document is rendered, tokenized without added special tokens and followed by EOS;
    documents are concatenated and cut into rows (packing measurably helps calibration,
    Minitron P1). Local files are shuffled with `seed`; hub datasets are streamed and shuffled
    in a buffer with `seed`. Returns fewer rows than asked when the data runs out (at least 1).
    """
    rows = list(itertools.islice(packed_rows(dataset, tokenizer, seq_len, seed), num_rows))
    if not rows:
        raise UserError(f"DATASET={dataset!r} yields fewer than one row of SEQ_LEN={seq_len} "
                        f"tokens; use more data or a smaller SEQ_LEN")
    return torch.stack(rows)


def documents(dataset: str, seed: int, skip: int = 0):
    """The documents of DATASET: a local file shuffled with `seed`, or a hub dataset streamed;
    the first `skip` of them left out."""
    path = Path(dataset)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"DATASET={dataset!r}: no such file")
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"DATASET={dataset!r}: local files must be {', '.join(LOCAL_SUFFIXES)}")
        docs = _documents_from_file(path)
        random.Random(seed).shuffle(docs)
        return docs[skip:]
    return _documents_from_hub(dataset, seed, skip)


def packed_rows(dataset: str, tokenizer, seq_len: int, seed: int, position: dict | None = None):
    """Yield rows of `seq_len` token ids one at a time, packed exactly like `calibration_rows`
    (its first N rows are these first N rows), for data too large to hold in memory.

    `position`, when given, is {"documents": n, "carry": [token ids]}: start after the first n
    documents with those tokens already in the packing buffer. It is updated in place before
    each row is yielded, so a copy taken after any row resumes the stream right after that row
    without re-reading or re-tokenizing what came before ({"documents": 0, "carry": []}: the start).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("MODEL's tokenizer has no eos token to separate packed documents")
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
        buf.extend(tokenizer(render(doc, tokenizer), add_special_tokens=False)["input_ids"])
        buf.append(eos)
        position["documents"] += 1


def batches(rows: torch.Tensor, batch_size: int):
    """Consecutive slices of `rows`, `batch_size` at a time (the last may be smaller)."""
    for i in range(0, len(rows), batch_size):
        yield rows[i:i + batch_size]


# ----------------------------------------------------------------------------------------------
# Held-out metrics computed in token chunks (a 100k vocabulary makes full logits the memory peak)

def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states for `ids`, without applying lm_head."""
    return model.model(input_ids=ids.to(input_device(model)), use_cache=False).last_hidden_state


def lm_loss(model, ids: torch.Tensor, chunk_tokens: int = 4096) -> tuple[float, int]:
    """Summed next-token cross-entropy (float32) and token count for rows `ids`, chunked."""
    hidden = final_hidden(model, ids)[:, :-1].flatten(0, 1)
    labels = ids[:, 1:].flatten().to(hidden.device)
    total = 0.0
    for i in range(0, len(labels), chunk_tokens):
        logits = model.lm_head(hidden[i:i + chunk_tokens]).float()
        total += torch.nn.functional.cross_entropy(
            logits, labels[i:i + chunk_tokens], reduction="sum").item()
    return total, len(labels)


@torch.no_grad()
def skip_loss(model, rows: torch.Tensor, batch_size: int, skip=()) -> float:
    """Mean LM loss on `rows` with the decoder layers in `skip` replaced by the identity.

    Skipping is a forward hook that returns the block's input as its output, so the model is
    never edited (layer indices, layer_types and the KV cache stay consistent).
    """
    def identity(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        return (h_in, *out[1:]) if isinstance(out, tuple) else h_in

    handles = [model.model.layers[i].register_forward_hook(identity, with_kwargs=True)
               for i in skip]
    try:
        total = count = 0
        for ids in batches(rows, batch_size):
            s, c = lm_loss(model, ids)
            total, count = total + s, count + c
    finally:
        for h in handles:
            h.remove()
    return total / count


@torch.no_grad()
def final_hiddens(model, rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`final_hidden` of each batch of `rows`: a teacher's, computed once for many students."""
    return [final_hidden(model, ids) for ids in batches(rows, batch_size)]


@torch.no_grad()
def evaluate(student, rows: torch.Tensor, batch_size: int, teacher=None,
             chunk_tokens: int = 2048, teacher_hidden: list[torch.Tensor] | None = None) -> dict:
    """Held-out metrics on `rows`: student (and teacher) perplexity, KL(teacher || student).

    Perplexity is exp(mean next-token NLL); KL is the mean over predicted tokens, temperature 1,
    in nats. Logits exist only `chunk_tokens` at a time, in float32. `teacher_hidden`, from
    `final_hiddens(teacher, rows, batch_size)`, saves running the teacher again.
    """
    nll_s = nll_t = kl = 0.0
    count = 0
    for b, ids in enumerate(batches(rows, batch_size)):
        hs = final_hidden(student, ids)[:, :-1].flatten(0, 1)
        ht = None
        if teacher is not None:
            ht = teacher_hidden[b] if teacher_hidden is not None else final_hidden(teacher, ids)
            ht = ht[:, :-1].flatten(0, 1)
        labels = ids[:, 1:].flatten()
        for i in range(0, len(labels), chunk_tokens):
            y = labels[i:i + chunk_tokens]
            ls = student.lm_head(hs[i:i + chunk_tokens]).float().log_softmax(-1)
            nll_s -= ls.gather(1, y.to(ls.device)[:, None]).sum().item()
            if ht is not None:
                lt = teacher.lm_head(ht[i:i + chunk_tokens]).float().log_softmax(-1).to(ls.device)
                nll_t -= lt.gather(1, y.to(lt.device)[:, None]).sum().item()
                kl += (lt.exp() * (lt - ls)).sum().item()
        count += len(labels)
    out = {"student_ppl": math.exp(nll_s / count), "tokens": count}
    if teacher is not None:
        out.update(teacher_ppl=math.exp(nll_t / count), kl=kl / count)
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints: an ordinary Hugging Face directory plus Pare's record, written atomically

RECORD = "pare.json"  # the human-readable record next to the weights (prune.py, distill.py)


def write_checkpoint(model, source: str, out_dir: str, record: dict,
                     trust_remote_code: bool = False, config_extra: dict | None = None) -> Path:
    """Save `model` as an HF directory at `out_dir`, atomically, with Pare's record.

    The tokenizer files (chat template included) and generation_config.json come from `source`
    (hub id or directory). Everything is written to a temporary sibling directory that replaces
    `out_dir` only once complete, so a crash never leaves a half-written model behind.
    `config_extra`: keys merged into the saved config.json as written (e.g. legacy RoPE keys
    that transformers' config setters would otherwise rewrite).
    """
    from transformers import GenerationConfig
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        if config_extra:
            config_json = json.loads((tmp / "config.json").read_text())
            config_json.update(config_extra)
            (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        load_tokenizer(source, trust_remote_code).save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(source).save_pretrained(tmp)
        except OSError:
            print(f"warning: {source} has no generation_config.json; none written")
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_record(model_dir: str) -> dict | None:
    """Pare's record of a checkpoint directory, or None if it has none."""
    path = Path(model_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# Paths and records

def check_writable(path: str, name: str, is_dir: bool = False) -> Path:
    """Fail before any work if `path` cannot be written (nearest existing parent not writable)."""
    p = Path(path)
    if p.exists() and p.is_dir() != is_dir:
        raise UserError(f"{name}={path!r} is a {'file' if is_dir else 'directory'}; "
                        f"expected a {'directory' if is_dir else 'file'} path")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{name}={path!r} is not writable ({parent} is not a writable directory)")
    return p


def versions() -> dict:
    """Versions of the packages that shape the numbers, for every artefact's record."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
