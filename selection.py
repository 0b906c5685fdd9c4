"""Several STUDENTs in distill.py: each is distilled briefly and the better ones longer (a funnel
by held-out KL, Minitron best practice 9: rank pruned candidates after a short retraining, not
zero-shot; P1 Figure 9), and the best goes on as the run. Its record is OUTPUT-select/pare.json.

    uv run distill.py STUDENT="['out/pruned', 'out/pruned-2']" SELECT_TOKENS=20_000_000
"""

import dataclasses
import json
import math
import types
from pathlib import Path

import torch

import checkpoints
import common


@dataclasses.dataclass(frozen=True)
class Funnel:
    """Successive halving (Jamieson and Talwalkar, arXiv 1502.07943): after each round the
    `keep` share by held-out KL goes on with `growth` x the previous round's tokens, until one
    is left; `flat`: every candidate runs every round (the flat search, for benchmarks)."""
    keep: float
    growth: float
    flat: bool


def root(output: str) -> str:
    """Where the candidates' runs and the selection's record live: OUTPUT-select."""
    return f"{output.rstrip('/')}-select"


def candidates(cfg) -> list:
    """The knobs of one run per student: `cfg` itself for one STUDENT; for a list, a copy per
    directory with STUDENT set to it and OUTPUT to its own directory under OUTPUT-select."""
    if not isinstance(cfg.STUDENT, list):
        return [cfg]
    dirs = cfg.STUDENT
    if len(dirs) < 2 or not all(isinstance(d, str) and d for d in dirs):
        raise common.UserError(f"STUDENT={dirs!r}: give one directory, or a list of two or more "
                               f"to select between")
    if len({Path(d).resolve() for d in dirs}) < len(dirs):
        raise common.UserError(f"STUDENT={dirs!r} names a directory twice")
    return [types.SimpleNamespace(**{**vars(cfg), "STUDENT": d,
                                     "OUTPUT": str(Path(root(cfg.OUTPUT)) / f"{i}-{Path(d).name}")})
            for i, d in enumerate(dirs)]


def check_teachers(runs: list, models: list):
    """Candidates are compared on one teacher's KL: the same teacher, by content."""
    for run, m in zip(runs[1:], models[1:]):
        if m.teacher_id != models[0].teacher_id:
            raise common.UserError(f"the candidates have different teachers ({runs[0].STUDENT!r}: "
                                   f"{models[0].teacher!r}, {run.STUDENT!r}: {m.teacher!r}); "
                                   f"select between students of one teacher, or set TEACHER")


def kept_after_round(n: int, keep: float) -> int:
    """How many of n candidates go on: `keep` of them rounded up, and at least one fewer."""
    return min(n - 1, math.ceil(n * keep))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A selection: the step each round ends at, the funnel, the directory of its runs and
    record (OUTPUT-select), and the settings a resumed selection must share (`settings`)."""
    ends: list
    funnel: Funnel
    select_dir: Path
    settings: dict


def round_ends(n: int, first_steps: int, funnel: Funnel) -> list[int]:
    """The step at which each round ends (the same for every candidate in it): the first after
    `first_steps`, each next `funnel.growth` x longer, as many as it takes to leave one."""
    ends, alive = [], n
    while alive > 1:
        ends.append((ends[-1] if ends else 0) + round(first_steps * funnel.growth ** len(ends)))
        alive = kept_after_round(alive, funnel.keep)
    return ends


def plan_rounds(n: int, select_tokens: int, eval_samples: int, tokens_per_step: int,
                max_steps: int, stop_at_step: int | None, shard: bool, funnel: Funnel) -> list[int]:
    """`round_ends` for SELECT_TOKENS in the first round, checked against the run's knobs."""
    if shard:
        raise common.UserError("several STUDENTs are selected between without sharding: run the "
                               "selection with FSDP=False (DDP), then shard the winner's run")
    if not eval_samples:
        raise common.UserError("several STUDENTs are ranked by held-out KL: set EVAL_SAMPLES > 0")
    if select_tokens < 0 or 0 < select_tokens < tokens_per_step:
        raise common.UserError(f"SELECT_TOKENS={select_tokens} is less than one step's "
                               f"{tokens_per_step} tokens (GLOBAL_BATCH x SEQ_LEN); 0 ranks zero-shot")
    ends = round_ends(n, select_tokens // tokens_per_step, funnel)
    if stop_at_step is not None and stop_at_step < ends[-1]:
        raise common.UserError(f"_STOP_AT_STEP={stop_at_step} stops the winner's run after the "
                               f"selection, whose rounds end at step {ends[-1]}: set it above "
                               f"that, or None")
    if ends[-1] > max_steps:
        raise common.UserError(f"the selection's {len(ends)} rounds take {ends[-1]} steps, more "
                               f"than the run's {max_steps}: lower SELECT_TOKENS or raise "
                               f"MAX_STEPS")
    common.print0(f"selection: {n} candidates, {len(ends)} rounds ending at steps {ends} "
                  f"({'flat: every candidate runs every round' if funnel.flat else 'funnel'})")
    return ends


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's rank correlation of two score lists (tau-a: tied pairs count 0)."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    if not pairs:
        return None
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    return sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def ranking(entries: list[dict], r: int, among: list[int] | None = None) -> list[int]:
    """Indices of `entries` (or of those `among` them) best first by KL after round r (-1:
    zero-shot); ties by zero-shot KL, then by student path, so that the order the candidates
    were given in does not count."""
    def kl(e):
        return e["zero_shot_kl"] if r < 0 else e["kl"][r]
    among = range(len(entries)) if among is None else among
    return sorted(among, key=lambda i: (kl(entries[i]), entries[i]["zero_shot_kl"],
                                        entries[i]["student"]))


def survivors(entries: list[dict], alive: list[int], r: int, funnel: Funnel) -> list[int]:
    if funnel.flat:
        return alive
    return ranking(entries, r, alive)[:kept_after_round(len(alive), funnel.keep)]


# ---- the record: OUTPUT-select/pare.json, and selection.json next to the winner ----------------

def settings(knobs: dict, recipe: dict, resumable: set, models: list, ends: list[int]) -> dict:
    """What a resumed selection must share with the run that began it (SELECT_TOKENS too)."""
    return {"knobs": {k: v for k, v in knobs.items() if k not in resumable - {"SELECT_TOKENS"}},
            "recipe": {k: v for k, v in recipe.items() if k not in resumable},
            "round_ends": ends, "students": [m.student_id for m in models],
            "teacher": models[0].teacher_id}


def new_record(runs: list, models: list, now: dict) -> dict:
    """A new selection's record: its settings `now`, one entry per candidate (KL per round), the
    rounds as they finish, the winner."""
    entries = []
    for run, m in zip(runs, models):
        shape = common.shape_of(m.s_conf)
        entries.append({"student": run.STUDENT, "output": run.OUTPUT, "shape": shape,
                        "params": common.param_count(shape, m.s_conf)["total"],
                        "zero_shot_kl": None, "kl": [], "zero_shot_accuracy": None,
                        "accuracy": []})
    return {"stage": "distill-select", "settings": now, "candidates": entries, "rounds": [],
            "winner": None, "versions": common.versions(), "created": common.now()}


def write_record(path: Path, record: dict):
    if common.is_first_process():
        common.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def read_record(select_dir: Path, now: dict) -> dict | None:
    """The record of the selection in `select_dir` to continue (None if there is none), refused
    with a message naming the directory when it was begun with settings other than `now`."""
    path = select_dir / common.RECORD
    if not path.is_file():
        return None
    record = common.read_json(path, "selection record", ("settings", "candidates", "rounds"),
                              stage="distill-select", fix=f"delete {select_dir}")
    changed = sorted(common.changed_settings(record["settings"], now))
    if changed:
        raise common.UserError(f"{select_dir} holds a selection begun with other {changed}; "
                               f"restore them or delete {select_dir} to start again")
    return record


def shared_value(acc, value: float | None) -> float:
    """The first process's number on every process (only it evaluates without FSDP)."""
    if acc.num_processes == 1:
        return value
    mine = value if common.is_first_process() and value is not None else 0.0
    missing = float(common.is_first_process() and value is None)  # None travels as a flag
    t = torch.tensor([mine, missing], dtype=torch.float64, device=acc.device)
    total, none = acc.reduce(t, "sum").tolist()
    return None if none else total


def add_result(record: dict, i: int, start_kl: float | None, final_kl: float | None,
               start_acc: float | None = None, final_acc: float | None = None):
    """Candidate i's held-out KL (and downstream accuracy, when measured) before its first
    round and after this one."""
    e = record["candidates"][i]
    e["zero_shot_kl"] = start_kl
    e["kl"].append(final_kl)
    if final_acc is not None:
        e["zero_shot_accuracy"] = start_acc
        e["accuracy"].append(final_acc)


def close_round(record: dict, r: int, end: int, alive: list[int], tokens_per_step: int):
    """Round r's entry (once): its candidates, tokens, and the Kendall tau between the
    zero-shot ranking and the ranking after it."""
    if len(record["rounds"]) > r:
        return
    entries = record["candidates"]
    zero = [entries[i]["zero_shot_kl"] for i in alive]
    kls = [entries[i]["kl"][r] for i in alive]
    measured = all(len(entries[i]["accuracy"]) > r for i in alive)
    record["rounds"].append({"end_step": end, "candidates": [entries[i]["output"] for i in alive],
                             "tokens_per_candidate": end * tokens_per_step,
                             "kendall_tau": kendall_tau(zero, kls),
                             # does lower KL mean higher accuracy among them? (1: always)
                             "kendall_tau_kl_accuracy": kendall_tau(kls, [
                                 -entries[i]["accuracy"][r] for i in alive]) if measured else None})


def shape_text(shape: dict) -> str:
    return (f"h{shape['hidden_size']} f{shape['intermediate_size']} "
            f"a{shape['num_attention_heads']}/{shape['num_key_value_heads']} "
            f"L{shape['num_hidden_layers']}")


def table(record: dict, r: int) -> str:
    """The table after round r: candidates best first, KL at each round end so far, rank now
    against the zero-shot rank, and the Kendall tau between those rankings."""
    entries, ends = record["candidates"], record["settings"]["round_ends"][:r + 1]
    head = (f"{'candidate':<24} {'shape':<22} {'params':>8} {'kl@0':>8} "
            + " ".join(f"{f'kl@{e}':>8}" for e in ends) + f" {'acc':>6} {'rank':>5} {'zero-shot':>9}")
    lines = [head]
    zero = ranking(entries, -1)
    now = ranking(entries, r, [i for i in range(len(entries)) if len(entries[i]["kl"]) > r])
    for i in now + [i for i in zero if i not in now]:
        e = entries[i]
        kls = " ".join(f"{e['kl'][k]:>8.4f}" if k < len(e["kl"]) else f"{'-':>8}"
                       for k in range(len(ends)))
        rank = str(now.index(i) + 1) if i in now else "out"
        acc = e["accuracy"][min(r, len(e["accuracy"]) - 1)] if e["accuracy"] else None
        lines.append(f"{Path(e['output']).name[:24]:<24} {shape_text(e['shape']):<22} "
                     f"{e['params'] / 1e6:>7.2f}M {e['zero_shot_kl']:>8.4f} {kls} "
                     f"{'-' if acc is None else f'{acc:.1f}':>6} {rank:>5} {zero.index(i) + 1:>9}")
    round_ = record["rounds"][r] if r < len(record["rounds"]) else {}
    tau, tau_acc = round_.get("kendall_tau"), round_.get("kendall_tau_kl_accuracy")
    lines.append(f"kendall_tau: {'-' if tau is None else f'{tau:.3f}'} (zero-shot vs after "
                 f"round {r + 1}, over its {len(now)} candidates)")
    if tau_acc is not None:
        lines.append(f"kendall_tau_kl_accuracy: {tau_acc:.3f} (the KL ranking vs the downstream "
                     f"accuracy ranking after round {r + 1})")
    return "\n".join(lines)


def winner(record: dict, alive: list[int]) -> int:
    """The best of the last round's candidates, recorded as the winner."""
    entries, r = record["candidates"], len(record["settings"]["round_ends"]) - 1
    best = ranking(entries, r, alive)[0]
    record["winner"] = entries[best]["output"]
    common.print0(f"selection: winner {entries[best]['student']} (KL {entries[best]['kl'][-1]:.4f} "
                  f"after {record['settings']['round_ends'][-1]} steps; zero-shot rank "
                  f"{ranking(entries, -1).index(best) + 1})")
    return best


def go_on_with_winner(cfg, student: str, m, record: dict, run, root: Path, out_dir: Path,
                      train) -> dict:
    """The winner's run continues from its latest checkpoint, copied under `root`: to the
    schedule's end when MAX_STEPS is set, else it is written as it stands after the selection."""
    saved = checkpoints.complete(Path(record["winner"] + "-checkpoints"))  # none: no round trained
    run.acc.wait_for_everyone()
    if saved:
        checkpoints.adopt(saved[-1], root, cfg.OUTPUT)
    for entry in record["candidates"]:  # the selection is decided: their checkpoints are done
        checkpoints.clear(Path(entry["output"] + "-checkpoints"))
    run.acc.wait_for_everyone()
    go_on = cfg.MAX_STEPS is not None
    summary = train(types.SimpleNamespace(**{**vars(cfg), "STUDENT": student}), m, root, out_dir,
                    run.schedule.stop if go_on else record["settings"]["round_ends"][-1],
                    not go_on)
    if summary["output"]:
        write_record(out_dir / "selection.json", record)
    if not go_on:
        common.print0(f"selection: continue the winner's recovery from {root} with "
                      f"`uv run distill.py STUDENT={student!r}` and the other knobs as here")
    return {**summary, "selection": record}


def select(cfg, runs: list, models: list, plan: Plan, run, root: Path, out_dir: Path, train
           ) -> dict:
    """Every candidate distilled round by round by `train(knobs, Models, checkpoint root,
    output, stop step, always_write)` (distill.py's run of one student), one at a time, from its
    own checkpoints under OUTPUT-select; after each round the funnel's survivors go on. The
    winner's latest checkpoint becomes the run's under `root`, and the winner is written to
    `out_dir` (trained on to the schedule's end first when MAX_STEPS is set) with
    selection.json beside it. `run`: distill.py's Run (processes, schedule)."""
    acc, ends, record_path = run.acc, plan.ends, plan.select_dir / common.RECORD
    record = read_record(plan.select_dir, plan.settings) or new_record(runs, models, plan.settings)
    write_record(record_path, record)  # marks the directory before any checkpoint
    entries, alive = record["candidates"], list(range(len(runs)))
    for r, end in enumerate(ends):
        common.print0(f"selection round {r + 1}/{len(ends)}: {len(alive)} candidates to step {end} "
                      f"({(end - (ends[r - 1] if r else 0)) * run.schedule.tokens_per_step:,} "
                      f"tokens each)")
        for i in alive:
            if len(entries[i]["kl"]) > r:
                continue  # finished by an earlier run of this selection
            s = train(runs[i], models[i], Path(f"{runs[i].OUTPUT}-checkpoints"),
                      Path(runs[i].OUTPUT), end, True)
            downstream = run.suite is not None  # the same on every process
            add_result(record, i, shared_value(acc, s["start"].get("kl")),
                       shared_value(acc, s["final"].get("kl")),
                       shared_value(acc, s["start"].get("accuracy")) if downstream else None,
                       shared_value(acc, s["final"].get("accuracy")) if downstream else None)
            write_record(record_path, record)
        close_round(record, r, end, alive, run.schedule.tokens_per_step)
        write_record(record_path, record)
        common.print0(table(record, r))
        alive = survivors(entries, alive, r, plan.funnel)
    best = winner(record, alive)
    write_record(record_path, record)
    return go_on_with_winner(cfg, runs[best].STUDENT, models[best], record, run, root, out_dir,
                             train)
