"""distill.py with several STUDENTs: the selection funnel (Minitron best practice 9)."""

import json
import os
import signal

import pytest
import torch

import common
import distill
import importance_analysis as ia
import prune
import selection
from conftest import (llama_config, make_model, make_tokenizer, olmo3_config, recipe, save_model,
                      split_args)
from test_distill import FAST, make_teacher, prune_like, write_student

SELECT = ["SELECT_TOKENS=256", "_EVAL_EVERY=1000"]  # 128 tokens a step: rounds end at 2, 6


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A teacher and three students cut from it: two by slicing (ffn 64 and 48), one whose kept
    MLP weights are replaced by random ones (clearly worse)."""
    root = tmp_path_factory.mktemp("family")
    teacher = make_teacher()
    teacher_dir = save_model(teacher, root / "teacher")
    layers = [0, 1, 2, 3]
    dirs = {}
    for name, ffn in (("wide", 64), ("narrow", 48), ("broken", 64)):
        student = prune_like(teacher, layers, ffn=ffn)
        if name == "broken":
            torch.manual_seed(7)
            with torch.no_grad():
                for layer in student.model.layers:
                    for lin in (layer.mlp.up_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
                        lin.weight.normal_(0, 0.5)
        dirs[name] = write_student(teacher_dir, student, layers, root / name)
    data = root / "corpus.txt"
    from conftest import TEXT
    data.write_text("\n\n".join(TEXT.splitlines() * 20), encoding="utf-8")
    return {"teacher": teacher_dir, "data": str(data), **dirs}


def run(students, data, out, *args):
    knobs, private = split_args([*FAST, *SELECT, *args])
    with recipe(distill, **private):
        return distill.main([f"STUDENT={students!r}", f"DATASET={data}", f"OUTPUT={out}", *knobs])


def weights(path) -> dict:
    return common.load_model(str(path), "cpu", torch.float32).state_dict()


def by_student(record) -> dict:
    return {e["student"]: (e["zero_shot_kl"], e["kl"]) for e in record["candidates"]}


def test_funnel_drops_the_worse_candidate_and_order_does_not_count(family, tmp_path):
    names = [family["wide"], family["narrow"], family["broken"]]
    s = run(names, family["data"], tmp_path / "a")
    rec = s["selection"]
    first, second = rec["rounds"]
    assert len(first["candidates"]) == 3 and len(second["candidates"]) == 2
    assert [e["student"] for e in rec["candidates"] if e["output"] not in second["candidates"]] == [
        family["broken"]]  # out after the first round
    assert [len(e["kl"]) for e in rec["candidates"]] == [2, 2, 1]
    assert first["end_step"] == 2 and second["end_step"] == 6 and s["steps"] == 6
    winner = next(e for e in rec["candidates"] if e["output"] == rec["winner"])
    assert winner["kl"][-1] == min(e["kl"][-1] for e in rec["candidates"] if len(e["kl"]) == 2)
    # the record next to the winner, the winner's weights, every candidate loadable
    assert json.loads((tmp_path / "a" / "selection.json").read_text()) == rec
    assert common.read_record(tmp_path / "a")["stage"] == "distill"
    out, best = weights(tmp_path / "a"), weights(winner["output"])
    assert all(torch.equal(out[k], best[k]) for k in out)
    rows = common.calibration_rows(family["data"], make_tokenizer(), 4, 32, 0)
    teacher = common.load_model(family["teacher"], "cpu", torch.float32)
    for e in rec["candidates"]:
        model = common.load_model(e["output"], "cpu", torch.float32)
        assert common.evaluate(model, rows, 2, teacher)["kl"] == pytest.approx(e["kl"][-1], rel=1e-4)
    # the same candidates in another order: the same numbers per student and the same winner
    again = run(names[::-1], family["data"], tmp_path / "b")["selection"]
    assert by_student(again) == by_student(rec)
    winner_student = lambda r: next(e["student"] for e in r["candidates"] if e["output"] == r["winner"])  # noqa: E731
    assert winner_student(again) == winner_student(rec)


def test_zero_tokens_is_the_zero_shot_ranking(family, tmp_path):
    s = run([family["broken"], family["narrow"], family["wide"]], family["data"], tmp_path / "z",
            "SELECT_TOKENS=0")
    rec = s["selection"]
    assert all(k == e["zero_shot_kl"] for e in rec["candidates"] for k in e["kl"])
    assert [r["kendall_tau"] for r in rec["rounds"]] == [1.0, 1.0]
    best = min(rec["candidates"], key=lambda e: e["zero_shot_kl"])
    assert rec["winner"] == best["output"] and s["steps"] == 0


def test_killed_selection_resumes_to_the_same_table(family, tmp_path, monkeypatch):
    names = [family["wide"], family["narrow"], family["broken"]]
    full = run(names, family["data"], tmp_path / "full")
    real, calls = distill.train_step, {"n": 0}

    def ctrl_c_in_round_two(*args):  # calls 1-6: round one; 7-8 the first survivor's round two
        calls["n"] += 1
        if calls["n"] == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(distill, "train_step", ctrl_c_in_round_two)
    with pytest.raises(common.Interrupted, match="stopped after step 4"):
        run(names, family["data"], tmp_path / "k")
    partial = json.loads((tmp_path / "k-select" / common.RECORD).read_text())
    assert len(partial["rounds"]) == 1 and partial["winner"] is None
    monkeypatch.setattr(distill, "train_step", real)
    rest = run(names, family["data"], tmp_path / "k")
    assert by_student(rest["selection"]) == by_student(full["selection"])  # bit-identical on CPU
    a, b = weights(tmp_path / "full"), weights(tmp_path / "k")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # begun with other settings: refused, naming the directory; a resumable setting is not
    with pytest.raises(common.UserError, match="k-select holds a selection begun with other"):
        run(names, family["data"], tmp_path / "k", "LR=1e-3")
    assert by_student(run(names, family["data"], tmp_path / "k", "_EVAL_EVERY=3")[
        "selection"]) == by_student(full["selection"])
    # killed during the very first candidate's first round (before any result): resumes too
    calls["n"] = 0
    monkeypatch.setattr(distill, "train_step", lambda *a: (
        calls.__setitem__("n", calls["n"] + 1), calls["n"] == 1 and os.kill(os.getpid(),
                                                                            signal.SIGINT),
        real(*a))[-1])
    with pytest.raises(common.Interrupted, match="stopped after step 1"):
        run(names, family["data"], tmp_path / "k1")
    monkeypatch.setattr(distill, "train_step", real)
    assert by_student(run(names, family["data"], tmp_path / "k1")["selection"]) == by_student(
        full["selection"])


def test_the_winner_goes_on_as_one_run(family, tmp_path):
    names = [family["wide"], family["narrow"], family["broken"]]
    s = run(names, family["data"], tmp_path / "s", "MAX_STEPS=9")
    rec = s["selection"]
    winner = next(e["student"] for e in rec["candidates"] if e["output"] == rec["winner"])
    knobs, private = split_args([*FAST, "MAX_STEPS=9"])
    with recipe(distill, **private):
        plain = distill.main([f"STUDENT={winner}", f"DATASET={family['data']}",
                              f"OUTPUT={tmp_path / 'plain'}", *knobs])
    assert s["steps"] == 9 and s["losses"] == plain["losses"][6:]  # no repeated warmup
    a, b = weights(tmp_path / "s"), weights(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "s" / "selection.json").is_file()
    # the selection is decided and the run finished: no candidate's or run's checkpoints remain
    assert not list((tmp_path / "s-select").glob("*-checkpoints"))
    assert not (tmp_path / "s-checkpoints").exists()
    # without MAX_STEPS the selection stops; distill.py continues the winner from its checkpoint
    s = run(names, family["data"], tmp_path / "t")
    knobs, private = split_args([*FAST, *SELECT, "_STOP_AT_STEP=8"])
    with recipe(distill, **private):
        go_on = distill.main([f"STUDENT={winner}", f"DATASET={family['data']}",
                              f"OUTPUT={tmp_path / 't'}", *knobs])
        once = distill.main([f"STUDENT={winner}", f"DATASET={family['data']}",
                             f"OUTPUT={tmp_path / 'once'}", *knobs])
    assert go_on["losses"] == once["losses"][6:8]


def test_bad_selection_inputs(family, tmp_path, monkeypatch):
    from test_safety import error
    other_teacher = make_teacher()
    with torch.no_grad():
        other_teacher.lm_head.weight.mul_(2)  # other weights: another teacher by content
    other = save_model(other_teacher, tmp_path / "other-teacher")
    from test_distill import prune_like as cut
    foreign = write_student(other, cut(make_teacher(), [0, 1, 2, 3], ffn=48), [0, 1, 2, 3],
                            tmp_path / "foreign")
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    data, names = family["data"], [family["wide"], family["narrow"]]
    assert "give one directory, or a list of two or more" in error(run, [family["wide"]], data,
                                                                   tmp_path / "o")
    assert "names a directory twice" in error(run, [family["wide"]] * 2, data, tmp_path / "o")
    assert "different teachers" in error(run, [family["wide"], foreign], data, tmp_path / "o")
    assert "less than one step's 128 tokens" in error(run, names, data, tmp_path / "o",
                                                      "SELECT_TOKENS=100")
    assert "lower SELECT_TOKENS or raise MAX_STEPS" in error(run, names, data, tmp_path / "o",
                                                             "MAX_STEPS=1")
    assert "set EVAL_SAMPLES > 0" in error(run, names, data, tmp_path / "o", "EVAL_SAMPLES=0")
    assert "_STOP_AT_STEP=1 stops the winner's run after the selection" in error(
        run, names, data, tmp_path / "o", "_STOP_AT_STEP=1")
    assert not any((tmp_path / n).exists() for n in ("o", "o-checkpoints", "o-select"))


@pytest.mark.parametrize("make_config,second_cut", [(olmo3_config, "TARGET_LAYERS=3"),
                                                    (llama_config, "TARGET_HEADS=2")])
def test_a_family_prune_distill_prune_distill(make_config, second_cut, tmp_path):
    """Best practice 1: prune+distill, then the same on the distilled model; every record keeps
    the lineage back to the original, whose model is still accepted as the teacher."""
    from transformers import AutoModelForCausalLM
    original = save_model(make_model(make_config(), seed=5), tmp_path / "original")
    data = tmp_path / "corpus.txt"
    from conftest import TEXT
    data.write_text("\n\n".join(TEXT.splitlines() * 20), encoding="utf-8")
    knobs, private = split_args(FAST)

    def generation(model, name, *cut):
        scores = tmp_path / f"{name}-scores.pt"
        ia.main([f"MODEL={model}", f"DATASET={data}", "NUM_SAMPLES=4", "SEQ_LEN=32",
                 "LOSS_SAMPLES=2", f"OUTPUT={scores}"])
        pruned = tmp_path / f"{name}-pruned"
        prune.main([f"MODEL={model}", f"SCORES={scores}", f"DATASET={data}", "NUM_SAMPLES=2",
                    "SEQ_LEN=32", *cut, f"OUTPUT={pruned}"])
        with recipe(distill, **private):
            distill.main([f"STUDENT={pruned}", f"DATASET={data}", f"OUTPUT={tmp_path / name}",
                          "MAX_STEPS=2", *knobs])
        return str(pruned), str(tmp_path / name)

    pruned1, first = generation(original, "first", "TARGET_FFN=64")
    pruned2, second = generation(first, "second", "TARGET_FFN=48", second_cut)
    rec = common.read_record(second)
    assert [(a["model"], a["stage"]) for a in rec["lineage"]] == [
        (original, "original"), (pruned1, "prune"), (first, "distill"), (pruned2, "prune")]
    assert rec["source_model"] == first and rec["distill"]["teacher"] == first  # the immediate source
    assert rec["lineage"][0]["shape"]["intermediate_size"] == 96
    assert [a["shape"]["intermediate_size"] for a in rec["lineage"]] == [96, 64, 64, 48]
    model = AutoModelForCausalLM.from_pretrained(second)
    conf = model.config
    assert conf.intermediate_size == 48
    if conf.model_type == "olmo3":
        assert conf.num_hidden_layers == 3 and len(conf.layer_types) == 3
    else:
        assert conf.num_attention_heads == 2
    # any ancestor is accepted as the teacher
    with recipe(distill, **private):
        s = distill.main([f"STUDENT={pruned2}", f"TEACHER={original}", f"DATASET={data}",
                          f"OUTPUT={tmp_path / 'from-original'}", "MAX_STEPS=2", *knobs])
    assert s["finished"] and common.read_record(tmp_path / "from-original")["distill"][
        "teacher"] == original


@pytest.mark.parametrize("keep,n,rounds", [(0.5, 4, 2), (0.5, 3, 2), (0.75, 3, 2), (0.9, 2, 1),
                                           (0.25, 8, 2)])
def test_the_funnel_always_narrows(keep, n, rounds):
    """Every round drops at least one candidate, whatever _SELECT_KEEP (no endless funnel)."""
    import types
    cfg = types.SimpleNamespace(EVAL_SAMPLES=4, SELECT_TOKENS=128)
    with recipe(distill, _SELECT_KEEP=keep):
        funnel = selection.Funnel(distill._SELECT_KEEP, distill._SELECT_GROWTH, distill._SELECT_FLAT)
        ends = selection.plan_rounds(n, cfg.SELECT_TOKENS, cfg.EVAL_SAMPLES, 128, 100, None, False,
                                     funnel)
        assert len(ends) == rounds and ends == sorted(ends)
        entries = [{"zero_shot_kl": float(i), "kl": [float(i)] * rounds, "student": str(i)}
                   for i in range(n)]
        alive = list(range(n))
        for r in range(rounds):
            alive = selection.survivors(entries, alive, r, funnel)
        assert alive == [0]
