"""Surprises that used to pass silently (issue: work is never lost, nothing is mixed up): each is
one clear error before any weights load, or is recorded so that the next stage finds it."""

import pytest
import torch

import common
import distill
from conftest import make_model, olmo3_config, save_model
from test_safety import (DEAD_PID, chain, error, no_loading, run_distill,  # noqa: F401
                         run_importance, run_prune)


def test_a_knob_given_twice_or_not_finite_is_said(chain, tmp_path, no_loading, capsys):  # noqa: F811
    """`NAME=1 NAME=2` kept the last silently; `LR=1e400` (inf) failed only after loading."""
    namespace = {"LR": 1e-4, "MAX_STEPS": 3, "__annotations__": {}}
    assert common.configure(namespace, ["LR=1e-3", "LR=2e-3"]).LR == 2e-3
    assert "warning: LR is given more than once (LR=1e-3 LR=2e-3); the last counts" in (
        capsys.readouterr().out)
    assert "not a finite number" in error(run_distill, chain["student"], chain["data"],
                                          tmp_path / "d", "LR=1e400")
    assert not (tmp_path / "d").exists()


def test_seq_len_past_the_models_positions_is_refused(chain, tmp_path, no_loading):  # noqa: F811
    """SEQ_LEN beyond max_position_embeddings (256 here) was accepted by every stage."""
    for run in (lambda: run_importance(chain["teacher"], chain["data"], tmp_path / "s.pt",
                                       "SEQ_LEN=512"),
                lambda: run_prune(chain, tmp_path / "p", "TARGET_FFN=48", "SEQ_LEN=512"),
                lambda: run_distill(chain["student"], chain["data"], tmp_path / "d",
                                    "SEQ_LEN=512")):
        assert "max_position_embeddings" in error(run)
    assert not any((tmp_path / n).exists() for n in ("s.pt", "p", "d", "d-checkpoints"))


def test_nan_weights_are_refused_not_scored(text_file, tmp_path):
    """NaN weights gave NaN scores and exit status 0."""
    model = make_model(olmo3_config())
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    bad = save_model(model, tmp_path / "bad")
    assert "NaN or infinite activations (mlp" in error(run_importance, bad, text_file,
                                                       tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "s.pt.partial").exists()


def test_paths_are_recorded_resolved(chain, tmp_path, monkeypatch):  # noqa: F811
    """A relative MODEL was recorded as typed, so the next stage broke when run elsewhere."""
    import shutil
    shutil.copytree(chain["teacher"], tmp_path / "here")
    monkeypatch.chdir(tmp_path)
    scores = run_importance("here", chain["data"], tmp_path / "s.pt", "LOSS_SAMPLES=0")
    assert scores["meta"]["model"] == str((tmp_path / "here").resolve())
    run_prune(chain, tmp_path / "p", "TARGET_FFN=48", model="here", scores=str(tmp_path / "s.pt"))
    assert common.read_record(tmp_path / "p")["source_model"] == str((tmp_path / "here").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default teacher (the recorded source) is still found
    s = run_distill(str(tmp_path / "p"), chain["data"], tmp_path / "d", "MAX_STEPS=1")
    assert s["finished"]
    assert common.read_record(tmp_path / "d")["distill"]["teacher"] == str((tmp_path / "here").resolve())


# ---- bad data: found before any load, or named with a checkpoint -----------------------------

def test_a_bad_record_deep_in_a_local_file_is_refused_before_loading(chain, tmp_path, no_loading):  # noqa: F811
    """Defect 3: a record without a usable column 350 documents in stopped distill at step 110."""
    import json
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"The quick brown fox {i}. " * 8}) for i in range(400)]
    lines[350] = json.dumps({"title": "no text here"})
    data.write_text("\n".join(lines) + "\n")
    msg = error(run_distill, chain["student"], str(data), tmp_path / "o")
    assert "line 351 cannot be used: it has no 'messages' or 'text' column" in msg
    lines[350] = json.dumps({"messages": [{"role": "user", "content": 3}]})
    data.write_text("\n".join(lines) + "\n")
    assert "line 351 cannot be used: a turn" in error(run_distill, chain["student"], str(data),
                                                      tmp_path / "o")


def test_a_chat_template_that_fails_is_one_line(tokenizer):
    tok = tokenizer  # the session's fixture: its template is put back
    saved = tok.chat_template
    tok.chat_template = "{{ raise_exception('this template takes no tools') }}"
    try:
        msg = error(common.render, {"messages": [{"role": "user", "content": "hi"}]}, tok)
    finally:
        tok.chat_template = saved
    assert "chat template cannot render a DATASET record" in msg and "this template takes" in msg


def test_a_bad_record_found_while_training_keeps_the_steps(chain, tmp_path, monkeypatch):  # noqa: F811
    """Defect 3: a bad record found late (a streamed dataset) stopped with no checkpoint."""
    full = run_distill(chain["student"], chain["data"], tmp_path / "full", "MAX_STEPS=4")
    real = distill.Batches.next

    def bad_at_step_3(self, step):
        if step == 3:
            raise common.UserError("DATASET has a record that cannot be used: (planted)")
        return real(self, step)

    monkeypatch.setattr(distill.Batches, "next", bad_at_step_3)
    out = tmp_path / "d"
    msg = error(run_distill, chain["student"], chain["data"], out, "MAX_STEPS=4")
    assert "(planted)" in msg and "read for step 3; checkpoint" in msg
    assert (tmp_path / "d-checkpoints" / "step-0000002").is_dir()
    monkeypatch.setattr(distill.Batches, "next", real)
    assert run_distill(chain["student"], chain["data"], out, "MAX_STEPS=4")["losses"] == (
        full["losses"][2:])


# ---- files that belong together, and earlier outputs -------------------------------------------

def test_grams_of_another_run_are_refused(chain, tmp_path):  # noqa: F811
    """Defect 4: an older scores.pt beside another run's Grams was repaired with, exit 0."""
    import shutil
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    run_importance(chain["teacher"], chain["data"], a, "LOSS_SAMPLES=0")
    run_importance(chain["teacher"], chain["data"], b, "LOSS_SAMPLES=0")
    shutil.copy(tmp_path / "b.gram.safetensors", tmp_path / "a.gram.safetensors")
    assert "belong to another run of importance_analysis.py" in error(
        run_prune, chain, tmp_path / "p", "TARGET_FFN=48", scores=str(a))
    assert not (tmp_path / "p").exists()


def test_a_previous_output_left_aside_by_a_killed_swap_is_put_back(chain, tmp_path):  # noqa: F811
    """Defect 4: a kill between write_atomic's two renames hid the previous output, and the next
    run of the same output deleted it."""
    import os
    out = tmp_path / "p"
    run_prune(chain, out, "TARGET_FFN=48")
    os.replace(out, tmp_path / f".p.old-{DEAD_PID}")
    common.check_output(str(out), "OUTPUT", {}, lambda p: True)
    assert common.read_record(out)["stage"] == "prune"


def test_files_a_user_added_to_an_output_survive_its_replacement(chain, tmp_path, capsys):  # noqa: F811
    """Defect 6: re-running into an earlier output deleted the user's notes and eval results."""
    out = tmp_path / "p"
    run_prune(chain, out, "TARGET_FFN=48")
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "arc.json").write_text("{}")
    run_prune(chain, out, "TARGET_FFN=32")
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "arc.json").is_file()
    assert common.read_record(out)["shape"]["intermediate_size"] == 32
    assert "2 file(s) Pare did not write, kept in the new output: eval, notes.txt" in (
        capsys.readouterr().out)


def test_checkpoints_finished_damaged_and_resumed(chain, tmp_path, capsys):  # noqa: F811
    """Defect 6: a finished run left its checkpoints (a rerun resumed from a stale one); a damaged
    latest checkpoint was found only after loading, and the advice deleted the intact one too."""
    args = ["MAX_STEPS=6", "_CHECKPOINT_EVERY=2"]
    full = run_distill(chain["student"], chain["data"], tmp_path / "full", *args)
    assert not (tmp_path / "full-checkpoints").exists()  # finished: its output is complete
    out = tmp_path / "d"
    run_distill(chain["student"], chain["data"], out, *args, "_STOP_AT_STEP=4")
    latest = tmp_path / "d-checkpoints" / "step-0000004" / "model.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # a write cut short
    rest = run_distill(chain["student"], chain["data"], out, *args)
    assert "step-0000004 is damaged (model.pt is truncated or corrupt); resuming from the one " \
           "before it" in capsys.readouterr().out
    assert rest["losses"] == full["losses"][2:]
    again = run_distill(chain["student"], chain["data"], out, *args)  # the same command again
    assert again["losses"] == full["losses"]  # starts afresh: no stale checkpoint to resume


# ---- identity by content where a path can lie --------------------------------------------------

def test_the_recorded_source_with_other_weights_is_refused(chain, tmp_path, no_loading):  # noqa: F811
    """Defect 5: distill's default teacher was used when other weights sat at its path."""
    import shutil
    src, student = tmp_path / "src", tmp_path / "student"
    shutil.copytree(chain["teacher"], src)
    shutil.copytree(chain["student"], student)
    record = common.read_record(student)
    record["source_model"] = str(src)
    (student / common.RECORD).write_text(__import__("json").dumps(record))
    make_model(olmo3_config(), seed=9).save_pretrained(src)  # other weights at the same path
    assert "holds other weights now than the model STUDENT was pruned from" in error(
        run_distill, str(student), chain["data"], tmp_path / "d")


def test_an_edited_dataset_does_not_resume(chain, tmp_path):  # noqa: F811
    """Defect 5: resuming after DATASET was edited was silent (a position, not the content)."""
    import shutil
    data = tmp_path / "data.txt"
    shutil.copy(chain["data"], data)
    out = tmp_path / "d"
    run_distill(chain["student"], str(data), out, "MAX_STEPS=4", "_STOP_AT_STEP=2")
    data.write_text(data.read_text().replace("fox", "cat"))
    assert "data_fingerprint" in error(run_distill, chain["student"], str(data), out, "MAX_STEPS=4")


def test_a_cache_moved_resumes_and_a_truncated_shard_is_named(chain, tmp_path):  # noqa: F811
    """Defect 5: a moved cache could not resume; a truncated shard was a traceback."""
    import shutil
    args = ["MAX_STEPS=4", "TOPK=8", "_CACHE_SHARD_ROWS=4"]
    out = tmp_path / "d"
    run_distill(chain["student"], chain["data"], out, *args, f"TEACHER_CACHE={tmp_path / 'c'}",
                "_STOP_AT_STEP=2")
    shutil.move(tmp_path / "c", tmp_path / "moved")
    shard = tmp_path / "moved" / "train-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "train-000000.safetensors in the teacher cache is truncated or corrupt" in error(
        run_distill, chain["student"], chain["data"], out, *args,
        f"TEACHER_CACHE={tmp_path / 'moved'}")
    shard.unlink()  # as the message says: the teacher writes it again
    s = run_distill(chain["student"], chain["data"], out, *args, f"TEACHER_CACHE={tmp_path / 'moved'}")
    assert s["finished"] and s["steps"] == 4


def test_a_complete_cache_on_a_read_only_disk_is_used(chain, tmp_path, monkeypatch):  # noqa: F811
    """Defect 5: a complete cache on a read-only disk was refused (as an output to write)."""
    import os
    cache = tmp_path / "ro" / "cache"
    args = ["MAX_STEPS=2", "TOPK=8", f"TEACHER_CACHE={cache}"]
    run_distill(chain["student"], chain["data"], tmp_path / "d", *args)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).startswith(
        str(tmp_path / "ro")) else real(p, mode, **k))  # root writes anywhere: pretend
    monkeypatch.setattr(distill, "load_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    assert run_distill(chain["student"], chain["data"], tmp_path / "e", *args)["finished"]


def test_an_output_being_written_is_locked_against_a_second_writer(chain, tmp_path, monkeypatch,  # noqa: F811
                                                                     capsys):
    """Defect 4: two runs writing the same OUTPUT at once were not prevented."""
    import fcntl
    import sys
    import prune
    out = tmp_path / "p"
    other = open(tmp_path / ".p.lock", "a+")  # another run holds it
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write("12345")
    other.flush()
    argv = [f"MODEL={chain['teacher']}", f"SCORES={chain['scores']}", f"DATASET={chain['data']}",
            "NUM_SAMPLES=2", "SEQ_LEN=32", "TARGET_FFN=48", f"OUTPUT={out}"]
    monkeypatch.setattr(sys, "argv", ["prune.py", *argv])
    with pytest.raises(SystemExit) as e:
        common.run(prune.main)
    assert e.value.code == 2 and not out.exists()
    assert "is being written by another run (process 12345)" in capsys.readouterr().err
    other.close()  # that run ended: the same command goes through
    common.run(prune.main)
    assert common.read_record(out)["stage"] == "prune"
    assert not (tmp_path / ".p.lock").exists()  # released with its lock file


def test_an_edited_dataset_does_not_resume_a_partial_scoring_pass(chain, tmp_path, capsys):  # noqa: F811
    """Defect 5: importance resumed its partial scoring pass after DATASET was edited."""
    import shutil
    import importance_analysis as ia
    data = tmp_path / "data.txt"
    shutil.copy(chain["data"], data)
    out = tmp_path / "s.pt"
    scores = run_importance(chain["teacher"], str(data), out, "LOSS_SAMPLES=0")
    partial = ia.partial_path(out)
    torch.save({**scores, "layer_loss": {}}, partial)  # as an interrupted run leaves it
    data.write_text(data.read_text().replace("fox", "cat"))
    run_importance(chain["teacher"], str(data), out, "LOSS_SAMPLES=0")
    assert f"warning: {partial} is from another model or other settings; starting again" in (
        capsys.readouterr().out)


def test_prune_holds_out_the_data_its_scores_were_made_from(chain, tmp_path, capsys):  # noqa: F811
    """Defect 7: prune's held-out data did not default to the scores' (4096-token rows of
    another dataset on a model of 256 positions)."""
    import prune
    prune.main([f"SCORES={chain['scores']}", "TARGET_FFN=48", "NUM_SAMPLES=2",
                f"OUTPUT={tmp_path / 'p'}"])
    config = common.read_record(tmp_path / "p")["config"]
    assert config["DATASET"] == chain["data"] and config["SEQ_LEN"] == 32  # the scores' own
    assert f"held-out data: DATASET={chain['data']!r}, SEQ_LEN=32 (from SCORES)" in (
        capsys.readouterr().out)


def test_a_later_damaged_checkpoint_never_costs_the_new_ones(chain, tmp_path):  # noqa: F811
    """Review: a damaged checkpoint numbered above the one resumed from outranked (and pruned)
    the new ones; a checkpoint of another version is refused, not passed over as damaged."""
    import json
    import shutil
    out, root = tmp_path / "d", tmp_path / "d-checkpoints"
    args = ["MAX_STEPS=6", "_CHECKPOINT_EVERY=1", "_KEEP_CHECKPOINTS=2"]
    run_distill(chain["student"], chain["data"], out, *args, "_STOP_AT_STEP=2")
    shutil.copytree(root / "step-0000002", root / "step-0000999")
    (root / "step-0000999" / "model.pt").write_bytes(b"cut short")
    run_distill(chain["student"], chain["data"], out, *args, "_STOP_AT_STEP=4")
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000003", "step-0000004",
                                                          "step-0000999"]
    progress = json.loads((root / "step-0000004" / "progress.json").read_text())
    del progress["evals"]  # as an older version wrote it
    (root / "step-0000004" / "progress.json").write_text(json.dumps(progress))
    assert "of this version of Pare (lacks ['evals'])" in error(run_distill, chain["student"],
                                                                   chain["data"], out, *args)


def test_shared_values_and_interrupted_swaps(tmp_path, monkeypatch):
    """Review: a missing accuracy crashed a multi-process selection; a stop between
    write_atomic's two renames deleted the previous output."""
    import os
    import selection

    class TwoProcesses:  # the first process's view: the other sends zeros
        num_processes, device = 2, "cpu"

        @staticmethod
        def reduce(t, op):
            return t
    assert selection.shared_value(TwoProcesses, None) is None
    assert selection.shared_value(TwoProcesses, 3.5) == 3.5
    path = tmp_path / "out.txt"
    path.write_text("previous")
    real, calls = os.replace, []

    def stopped(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # tmp -> path: the stop lands between the renames
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        common.write_atomic(path, lambda tmp: tmp.write_text("new"))
    monkeypatch.setattr(os, "replace", real)
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_records_chat_templates_can_render_are_accepted():
    """Review: turns whose content is None (tool calls) or a list of parts, and a null
    `messages` beside a usable `text`, were refused up front."""
    assert common.record_problem({"messages": [{"role": "assistant", "content": None}]}) is None
    assert common.record_problem({"messages": [{"role": "user", "content": [{"type": "text"}]}]}) is None
    assert common.record_problem({"messages": None, "text": "plain"}) is None
    assert "no 'messages' or 'text'" in common.record_problem({"title": "x"})


def test_a_cache_read_by_several_runs_is_not_locked(tmp_path, monkeypatch):
    """Review: the TEACHER_CACHE was locked for the whole run, refusing a second reader."""
    monkeypatch.setattr(common, "_claims", {})
    (tmp_path / "cache").mkdir()
    common.check_output(str(tmp_path / "cache"), "TEACHER_CACHE", {}, lambda p: True,
                        may_read_only=True)
    common.check_output(str(tmp_path / "out"), "OUTPUT", {}, lambda p: True)
    assert [t.name for t in common._claims] == ["out"] and not (tmp_path / ".cache.lock").exists()
    for f in common._claims.values():
        f.close()
