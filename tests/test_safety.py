"""A user's data is never lost, and every mistake a user can make is one clear `error:` line.

Each test names the defect it covers (the data-safety issue's numbering).
"""

import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import common
import checkpoints
import distill
import importance_analysis as ia
import prune
from conftest import ROOT, make_model, olmo3_config, recipe, save_model, script_cmd, split_args
from test_distill import FAST, make_teacher
from test_prune import yarn_olmo  # noqa: F401  (a fixture: a tiny Olmo 3 with YaRN and its scores)

DEAD_PID = 4_194_999  # above Linux's largest pid: no process has it


@pytest.fixture(scope="module")
def chain(tmp_path_factory, text_file):
    """A teacher, its scores and a pruned student, made by the real stages."""
    root = tmp_path_factory.mktemp("chain")
    teacher = save_model(make_teacher(), root / "teacher")
    scores = root / "scores.pt"
    ia.main([f"MODEL={teacher}", f"DATASET={text_file}", "NUM_SAMPLES=4", "SEQ_LEN=32",
             "LOSS_SAMPLES=2", f"OUTPUT={scores}"])
    student = root / "pruned"
    prune.main([f"MODEL={teacher}", f"SCORES={scores}", f"DATASET={text_file}", "NUM_SAMPLES=2",
                "SEQ_LEN=32", "TARGET_FFN=48", f"OUTPUT={student}"])
    return {"teacher": teacher, "scores": str(scores), "student": str(student), "data": text_file}


def run_distill(student, data, out, *args):
    knobs, private = split_args([*FAST, *args])
    with recipe(distill, **private):
        return distill.main([f"STUDENT={student}", f"DATASET={data}", f"OUTPUT={out}", *knobs])


def run_prune(chain, out, *args, model=None, scores=None):
    return prune.main([f"MODEL={model or chain['teacher']}", f"SCORES={scores or chain['scores']}",
                       f"DATASET={chain['data']}", "NUM_SAMPLES=2", "SEQ_LEN=32",
                       f"OUTPUT={out}", *args])


def run_importance(model, data, out, *args):
    return ia.main([f"MODEL={model}", f"DATASET={data}", "NUM_SAMPLES=4", "SEQ_LEN=32",
                    "LOSS_SAMPLES=2", f"OUTPUT={out}", *args])


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(common.UserError) as e:
        fn(*args, **kwargs)
    return str(e.value)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model weights are loaded (errors must come before that)."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")
    monkeypatch.setattr(common, "load_model", refuse)


def tree(path: Path) -> dict:
    """{relative path: bytes} of everything under `path`."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- 1, 2, 12: outputs go only to new paths or a previous output of the same script ---------

def test_output_never_replaces_a_users_directory(chain, tmp_path, no_loading):
    """Defect 1: `OUTPUT=out` wiped out/scores.pt, out/corpus/ and a user's notes."""
    mine = tmp_path / "out"
    (mine / "corpus").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "corpus" / "a.txt").write_text("data")
    before = tree(mine)
    for fn, args in ((run_prune, (chain, mine, "TARGET_FFN=48")),
                     (run_distill, (chain["student"], chain["data"], mine, "MAX_STEPS=1"))):
        assert "is not a previous output of this script" in error(fn, *args)
        assert tree(mine) == before
    user_file = tmp_path / "results.pt"
    user_file.write_bytes(b"my results")
    assert "not a previous output" in error(run_importance, chain["teacher"], chain["data"],
                                            user_file)
    assert user_file.read_bytes() == b"my results"
    with pytest.MonkeyPatch.context() as mp:  # `OUTPUT=.` / `..` fail at once, not after pruning
        mp.chdir(tmp_path)
        for where in (".", ".."):
            assert "OUTPUT" in error(run_prune, chain, where, "TARGET_FFN=48")
    assert tree(mine) == before


def test_output_is_never_an_input(chain, tmp_path, no_loading):
    """Defect 2: prune OUTPUT=MODEL, distill OUTPUT=TEACHER or OUTPUT=STUDENT destroyed them."""
    teacher, student = Path(chain["teacher"]), Path(chain["student"])
    kept = {p: tree(p) for p in (teacher, student)}
    assert "the same path as MODEL" in error(run_prune, chain, teacher, "TARGET_FFN=48")
    assert "inside MODEL" in error(run_prune, chain, teacher / "sub", "TARGET_FFN=48")
    assert "a parent of MODEL" in error(run_prune, chain, teacher.parent, "TARGET_FFN=48")
    link = tmp_path / "link"
    link.symlink_to(teacher)
    assert "symbolic link" in error(run_prune, chain, link, "TARGET_FFN=48")
    # the teacher comes from the student's pare.json: it is an input all the same
    assert "the same path as TEACHER" in error(run_distill, student, chain["data"], teacher)
    assert "the same path as STUDENT" in error(run_distill, student, chain["data"], student)
    assert "inside MODEL" in error(run_importance, teacher, chain["data"], teacher / "s.pt")
    assert "the same path as DATASET" in error(run_importance, teacher, chain["data"],
                                               chain["data"])
    assert all(tree(p) == t for p, t in kept.items())


def test_previous_outputs_are_replaced_and_stale_temporaries_removed(chain, tmp_path):
    """Defects 1 and 5: a previous output of the same script is replaced whole; temporaries of
    killed runs (their process gone) are removed by the next run of the same output."""
    out = tmp_path / "pruned"
    run_prune(chain, out, "TARGET_FFN=48")
    stale = [tmp_path / f".pruned.tmp-{DEAD_PID}", tmp_path / f".pruned.old-{DEAD_PID}"]
    live = tmp_path / f".pruned.tmp-{os.getppid()}"  # another run in progress: never touched
    for p in stale:
        (p / "model.safetensors").parent.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 1000)
    live.mkdir()
    run_prune(chain, out, "TARGET_FFN=32")
    assert common.read_record(out)["shape"]["intermediate_size"] == 32
    assert not any(p.exists() for p in stale) and live.exists()
    scores = tmp_path / "scores.pt"
    (tmp_path / f".scores.pt.tmp-{DEAD_PID}").write_bytes(b"half a file")
    run_importance(chain["teacher"], chain["data"], scores)
    run_importance(chain["teacher"], chain["data"], scores)  # its own previous output
    assert sorted(p.name for p in tmp_path.glob(".scores*")) == []


# ---- 3: resume checks which student and teacher the checkpoints belong to -------------------

def test_resume_refuses_another_student_or_teacher(chain, tmp_path):
    """Defect 3: re-pruning into the same STUDENT path continued the old weights (or crashed
    with a size mismatch); the fingerprint check names the checkpoint directory instead."""
    student = tmp_path / "student"
    shutil.copytree(chain["student"], student)
    teacher = tmp_path / "teacher"
    shutil.copytree(chain["teacher"], teacher)
    out = tmp_path / "distilled"
    args = ["MAX_STEPS=4", "_STOP_AT_STEP=2", f"TEACHER={teacher}"]
    run_distill(student, chain["data"], out, *args)
    ckpts = tmp_path / "distilled-checkpoints"
    # the same student elsewhere is the same student: accepted (content, not path)
    # re-pruned into the same path, same shape, other neurons: other weights
    s = torch.load(chain["scores"], weights_only=True)
    s["mlp"] = s["mlp"].flip(1)
    flipped = tmp_path / "flipped.pt"
    torch.save(s, flipped)
    run_prune(chain, student, "TARGET_FFN=48", "REPAIR=False", scores=str(flipped))
    msg = error(run_distill, student, chain["data"], out, *args)
    assert "belongs to another student" in msg and f"delete {ckpts}" in msg
    run_prune(chain, student, "TARGET_FFN=32")  # another shape: the same message, no traceback
    assert "belongs to another student" in error(run_distill, student, chain["data"], out, *args)
    shutil.rmtree(student)
    shutil.copytree(chain["student"], student)  # the original student back: resumes
    # the teacher replaced by other weights of the same shape
    make_model(olmo3_config(), seed=7).save_pretrained(teacher)
    assert "belongs to another teacher" in error(run_distill, student, chain["data"], out, *args)
    shutil.rmtree(teacher)
    shutil.copytree(chain["teacher"], teacher)
    rest = run_distill(student, chain["data"], out, "MAX_STEPS=4", f"TEACHER={teacher}")
    assert rest["finished"] and rest["steps"] == 4 and len(rest["losses"]) == 2


# ---- 4: distill's output keeps prune's config extras ---------------------------------------

def test_distilled_config_keeps_legacy_rope(yarn_olmo, tmp_path):  # noqa: F811
    """Defect 4: transformers 4.57 loaded out/distilled with rope_theta 10000 and no YaRN."""
    model_dir, scores, data = yarn_olmo
    pruned = tmp_path / "pruned"
    prune.main([f"SCORES={scores}", f"DATASET={data}", "NUM_SAMPLES=2", "SEQ_LEN=32",
                "TARGET_FFN=64", f"OUTPUT={pruned}"])  # MODEL: the one SCORES was made from
    out = tmp_path / "distilled"
    run_distill(pruned, data, out, "MAX_STEPS=1", "EVAL_SAMPLES=0")
    for path in (pruned, out):
        raw = json.loads((path / "config.json").read_text())
        assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"]["rope_type"] == "yarn", path
        assert raw["head_dim"] == 16 and len(raw["layer_types"]) == 8
    assert common.read_record(out)["stage"] == "distill"


# ---- 5: write failures name the path (and a full disk) and leave nothing behind -------------

def file_size_limit(fn, limit=4096):
    """`fn` with the process allowed to write files of at most `limit` bytes while it runs: a
    real failed write inside torch's or safetensors' writer (SIGXFSZ ignored, EFBIG raised)."""
    def limited(*args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return fn(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)
    return limited


def test_failed_writes_are_one_line_naming_the_path(chain, tmp_path, monkeypatch):
    """Defect 5: a full disk gave a RuntimeError / SafetensorError traceback and left
    `.NAME.tmp-PID/` or `scores.pt.tmp` behind."""
    from transformers import PreTrainedModel
    scores = tmp_path / "scores.pt"
    monkeypatch.setattr(torch, "save", file_size_limit(torch.save, 1024))
    msg = error(run_importance, chain["teacher"], chain["data"], scores)
    assert msg.startswith(f"cannot write {scores}") and "\n" not in msg
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = tmp_path / "pruned"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        file_size_limit(PreTrainedModel.save_pretrained))
    msg = error(run_prune, chain, out, "TARGET_FFN=48")
    assert msg.startswith(f"cannot write {out}") and "File too large" in msg
    assert list(tmp_path.iterdir()) == []
    # the same failure with the disk nearly full is reported as a full disk
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 10))
    assert "the disk holding it is full" in error(run_prune, chain, out, "TARGET_FFN=48")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_write_failure_and_stale_checkpoint_temporary(chain, tmp_path, monkeypatch):
    out = tmp_path / "d"
    root = tmp_path / "d-checkpoints"
    run_distill(chain["student"], chain["data"], out, "MAX_STEPS=3", "_STOP_AT_STEP=1")
    (root / ".step-0000002.tmp").mkdir()  # a checkpoint killed half-written
    monkeypatch.setattr(torch, "save", file_size_limit(torch.save, 2048))
    msg = error(run_distill, chain["student"], chain["data"], out, "MAX_STEPS=3", "_STOP_AT_STEP=2")
    assert msg.startswith(f"cannot write {root / '.step-0000002.tmp'}")
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["pare.json", "step-0000001"]
    assert run_distill(chain["student"], chain["data"], out, "MAX_STEPS=3")["finished"]


# ---- 6: nothing in a checkpoint can run code on resume ------------------------------------

class Payload:
    """Unpickling this runs a command (what a crafted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_hold_no_pickled_code(chain, tmp_path):
    """Defect 6: accelerate loaded custom_checkpoint_0.pkl with weights_only=False on resume."""
    out = tmp_path / "d"
    run_distill(chain["student"], chain["data"], out, "MAX_STEPS=3", "_STOP_AT_STEP=1")
    ckpt = tmp_path / "d-checkpoints" / "step-0000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.pt", "optimizer.pt", "progress.json",
                                                      "rng-0.pt"]
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, ckpt / "model.pt")  # torch's own format, code inside
    msg = error(run_distill, chain["student"], chain["data"], out, "MAX_STEPS=3")
    assert "is not a checkpoint file of tensors" in msg and not marker.exists()
    with open(ckpt / "model.pt", "wb") as f:  # a bare pickle is no torch file: passed over
        pickle.dump({"x": Payload(marker)}, f)
    assert run_distill(chain["student"], chain["data"], out, "MAX_STEPS=3")["finished"]
    assert not marker.exists()
    # DCP's .metadata (FSDP checkpoints) is read through an allow-list
    dcp_dir = tmp_path / "dcp"
    dcp_dir.mkdir()
    with open(dcp_dir / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    assert "not a Pare checkpoint" in error(checkpoints.safe_reader(dcp_dir).read_metadata)
    assert not marker.exists()
    # and no code path unpickles without weights_only (or outside the allow-list)
    for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]:
        text = path.read_text()
        assert "weights_only=False" not in text and "pickle.load(" not in text, path


# ---- 7, 11: knobs, devices and model names --------------------------------------------------

def test_knob_types_and_devices_fail_before_loading(chain, tmp_path, no_loading):
    """Defect 7: None-default constants accepted any type and crashed, some after loading."""
    out = tmp_path / "out"
    assert "DEVICE='123' is not a torch device" in error(
        run_importance, chain["teacher"], chain["data"], out, "DEVICE=123")
    assert "DEVICE='gpu' is not a torch device" in error(
        run_prune, chain, out, "TARGET_FFN=48", "DEVICE=gpu")
    if not torch.cuda.is_available():
        assert "sees no GPU" in error(run_distill, chain["student"], chain["data"], out,
                                      "DEVICE=cuda")
    assert "MAX_STEPS='many'" in error(run_distill, chain["student"], chain["data"], out,
                                       "MAX_STEPS=many")
    assert "TARGET_PARAMS='abc'" in error(run_prune, chain, out, "TARGET_PARAMS=abc")
    assert "TARGET_FFN='1.5'" in error(run_prune, chain, out, "TARGET_FFN=1.5")
    assert "TEACHER='5'" in error(run_distill, chain["student"], chain["data"], out, "TEACHER=5")
    assert "is a recipe constant: edit _WARMUP_STEPS" in error(
        run_distill, chain["student"], chain["data"], out, "WARMUP_STEPS=3")
    assert "_DTYPE=123" in error(common.pick_dtype, 123, "cpu")
    assert not out.exists()


def test_every_none_knob_declares_its_type():
    for module in (ia, prune, distill):
        for name, value in common.knobs(vars(module)).items():
            if value is None:
                assert name in module.__annotations__, (module.__name__, name)


def test_model_names_get_advice_fast(chain, tmp_path, monkeypatch):
    """Defect 11: an offline hub id took 31 s and said only "couldn't connect"; a missing local
    path said "Repo id must be in the form..."; custom code did not say so; a teacher taken
    from pare.json was reported as TEACHER=..."""
    t0 = time.time()
    msg = error(common.load_config, "allenai/Olmo-3-7B-Instruct", "MODEL")
    assert "set MODEL to a local directory" in msg and time.time() - t0 < 10
    monkeypatch.chdir(tmp_path)
    Path("out").mkdir()
    assert "MODEL='out/pruned': no such directory" in error(common.load_config, "out/pruned")
    assert "no such directory" in error(common.load_config, "./nowhere")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps(
        {"model_type": "my-llm", "auto_map": {"AutoConfig": "modeling.MyConfig"}}))
    assert "trust_remote_code" in error(common.load_config, str(custom))
    bare = tmp_path / "bare"
    make_model(olmo3_config()).save_pretrained(bare)
    msg = error(common.load_tokenizer, str(bare))
    assert "cannot load a tokenizer from MODEL" in msg and "config.json" in msg
    student = tmp_path / "student"
    shutil.copytree(chain["student"], student)
    record = json.loads((student / "pare.json").read_text())
    record["source_model"] = str(tmp_path / "moved-teacher")
    (student / "pare.json").write_text(json.dumps(record))
    msg = error(run_distill, student, chain["data"], tmp_path / "d")
    assert f"source_model in {student / 'pare.json'}" in msg and "TEACHER=" not in msg


# ---- 8, 9: data and model files -----------------------------------------------------------

def test_bad_data_files(tokenizer, tmp_path):
    """Defect 8: non-UTF-8 text, a corrupt parquet and "text": null ended in tracebacks; a
    directory was reported as "no such file"."""
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n\nsecond".encode("latin-1"))
    assert "is not UTF-8 text" in error(common.calibration_rows, str(latin), tokenizer, 2, 8, 0)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert "is not a readable parquet file" in error(common.calibration_rows, str(broken),
                                                     tokenizer, 2, 8, 0)
    null = tmp_path / "null.jsonl"
    null.write_text('{"text": "fine"}\n{"text": null}\n')
    assert "'text' is None, not a string" in error(common.calibration_rows, str(null),
                                                   tokenizer, 2, 8, 0)
    listed = tmp_path / "list.jsonl"
    listed.write_text('["a", "b"]\n')
    assert "line 1 is not a JSON object" in error(common.calibration_rows, str(listed),
                                                  tokenizer, 2, 8, 0)
    assert "is a directory" in error(common.calibration_rows, str(tmp_path), tokenizer, 2, 8, 0)


def test_importance_seq_len_and_truncated_weights(chain, tmp_path, monkeypatch):
    """Defect 9: SEQ_LEN=1 crashed after the scoring pass; a truncated model.safetensors gave
    a SafetensorError after tokenising."""
    out = tmp_path / "s.pt"
    assert "SEQ_LEN must be at least 2" in error(run_importance, chain["teacher"], chain["data"],
                                                 out, "SEQ_LEN=1")
    cut = tmp_path / "cut"
    shutil.copytree(chain["teacher"], cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setattr(common, "calibration_rows", lambda *a, **k: pytest.fail("tokenized"))
    assert "is truncated or corrupt" in error(run_importance, str(cut), chain["data"], out)
    assert not out.exists()


# ---- 10: interrupts keep finished work ----------------------------------------------------

def test_importance_interrupt_keeps_the_scoring_pass(chain, tmp_path, monkeypatch):
    """Defect 10: Ctrl-C in the skip-loss phase discarded the finished scoring pass."""
    full = run_importance(chain["teacher"], chain["data"], tmp_path / "full.pt")
    out = tmp_path / "scores.pt"
    calls = {"n": 0}
    real = ia.loss_from_layer

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ia, "loss_from_layer", interrupted)
    with pytest.raises(common.Interrupted, match="2 skipped layers are saved in .*scores.pt.partial"):
        run_importance(chain["teacher"], chain["data"], out)
    assert not out.exists() and (tmp_path / "scores.pt.partial").exists()
    monkeypatch.setattr(ia, "loss_from_layer", real)
    monkeypatch.setattr(ia, "collect_scores", lambda *a, **k: pytest.fail("scored again"))
    again = run_importance(chain["teacher"], chain["data"], out)
    assert not (tmp_path / "scores.pt.partial").exists()
    for key in ("mlp", "attention", "attn_ln", "ffn_ln"):
        assert torch.equal(again[key], full[key])
    assert again["layer_loss"] == pytest.approx(full["layer_loss"], abs=1e-6)


def test_distill_interrupt_writes_a_checkpoint_and_resumes(chain, tmp_path, monkeypatch):
    """Defect 10: Ctrl-C in distill wrote no checkpoint (the default is every 500 steps)."""
    full = run_distill(chain["student"], chain["data"], tmp_path / "full", "MAX_STEPS=6")
    real, calls = distill.train_step, {"n": 0}

    def ctrl_c_during_step_3(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(distill, "train_step", ctrl_c_during_step_3)
    out = tmp_path / "d"
    with pytest.raises(common.Interrupted, match="stopped after step 3: checkpoint"):
        run_distill(chain["student"], chain["data"], out, "MAX_STEPS=6")
    assert (tmp_path / "d-checkpoints" / "step-0000003").is_dir() and not out.exists()
    monkeypatch.setattr(distill, "train_step", real)
    rest = run_distill(chain["student"], chain["data"], out, "MAX_STEPS=6")
    assert rest["losses"] == full["losses"][3:]  # bit-identical on CPU

    def twice(*args):  # a deliberate second Ctrl-C (not one delivered twice) stops at once,
        os.kill(os.getpid(), signal.SIGINT)  # without a checkpoint of this step
        time.sleep(common.REPEAT_WINDOW + 0.1)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(distill, "train_step", twice)
    with pytest.raises(common.Interrupted, match="stopped at once"):
        run_distill(chain["student"], chain["data"], tmp_path / "e", "MAX_STEPS=6")
    assert not (tmp_path / "e-checkpoints").exists()


def test_ctrl_c_is_one_line_as_users_see_it(chain, tmp_path):
    """Defect 10: Ctrl-C printed a ~70-line traceback."""
    cmd = script_cmd("distill.py", f"STUDENT={chain['student']}", f"DATASET={chain['data']}",
                     *FAST, "MAX_STEPS=2000", "EVAL_SAMPLES=0", f"OUTPUT={tmp_path / 'd'}",
                     "_ABORT_LOSS_FACTOR=1e9")  # the repaired student starts close: LR 3e-3 can jump
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step      2/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip() and "it/s]" not in x and "%|" not in x]
    assert lines[-1].startswith("interrupted: stopped after step") and "Traceback" not in err
    assert list((tmp_path / "d-checkpoints").glob("step-*"))


# ---- 12, 13: input checks and small-run traps ---------------------------------------------

def test_prune_input_checks(chain, tmp_path, llama_dir, text_file):
    """Defect 12: no target wrote a full copy; scores matched by path string only; NaN scores
    accepted; the hidden-size suggestion listed the largest sizes, not the nearest."""
    out = tmp_path / "out"
    assert "no target" in error(run_prune, chain, out)
    other = tmp_path / "same-path"  # other weights saved where the scored model was
    shutil.copytree(chain["teacher"], other)
    s = torch.load(chain["scores"], weights_only=True)
    s["meta"]["model"] = str(other)
    relabelled = tmp_path / "relabelled.pt"
    torch.save(s, relabelled)
    make_model(olmo3_config(), seed=9).save_pretrained(other)
    assert "with other weights than" in error(run_prune, chain, out, "TARGET_FFN=48",
                                              model=str(other), scores=str(relabelled))
    s["meta"]["model"] = chain["teacher"]
    s["mlp"][0, 0] = float("nan")
    torch.save(s, relabelled)
    assert "NaN or infinite values in 'mlp'" in error(run_prune, chain, out, "TARGET_FFN=48",
                                                      scores=str(relabelled))
    scores = tmp_path / "llama.pt"
    ia.main([f"MODEL={llama_dir}", f"DATASET={text_file}", "NUM_SAMPLES=2", "SEQ_LEN=32",
             "LOSS_SAMPLES=0", f"OUTPUT={scores}"])
    assert "the nearest that work: [44, 48, 52]" in error(
        run_prune, chain, out, "TARGET_HIDDEN=50", model=llama_dir, scores=str(scores))


def test_the_same_model_moved_is_accepted(chain, tmp_path, monkeypatch, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(chain["teacher"], moved)
    monkeypatch.chdir(tmp_path)
    run_prune(chain, tmp_path / "out", "TARGET_FFN=48", model="moved")  # relative path, copy
    assert "has the same content" in capsys.readouterr().out
    assert common.read_record(tmp_path / "out")["source_model"] == str(moved.resolve())  # resolved


def test_small_run_warnings_and_held_out_progress(chain, tmp_path, capsys):
    """Defect 13: warmup longer than the run, a 256-row batch on a CPU and a silent held-out
    evaluation in prune went without a word."""
    run_distill(chain["student"], chain["data"], tmp_path / "d", "MAX_STEPS=3", "_WARMUP_STEPS=50")
    printed = capsys.readouterr().out
    assert "warmup 0 steps (_WARMUP_STEPS=50 capped at a tenth of the 3 steps)" in printed
    with pytest.raises(common.UserError):  # far too little data for this, but warned first
        run_distill(chain["student"], chain["data"], tmp_path / "e", "GLOBAL_BATCH=256",
                    "SEQ_LEN=4096", "DEVICE=cpu")
    assert re.search(r"warning: 1,048,576 tokens per optimizer step .* on a CPU",
                     capsys.readouterr().out)
    run_prune(chain, tmp_path / "p", "TARGET_FFN=48")
    assert "held-out" in capsys.readouterr().err  # the evaluation's progress bar
