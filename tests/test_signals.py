"""Stops as users send them: one Ctrl-C through `uv run` or `timeout` reaches Python twice, a
scheduler's SIGTERM, a signal while the output is written; none loses finished work."""

import os
import signal
import subprocess
import sys

import pytest

import common
import distill
import prune
import teacher_cache
from conftest import ROOT, recipe, script_cmd, split_args
from test_distill import FAST
from test_safety import chain, run_distill  # noqa: F401  (a fixture: teacher, scores, student)


def stop_at_step_two(cmd, how):
    """Run `cmd` in its own process group, and once step 2 is logged stop it `how`: a SIGINT to
    the whole group (a terminal's Ctrl-C, `kill -INT -PGID`), or through `timeout -s INT`, which
    passes the signal to the command and to its process group, as when it expires."""
    if how == "timeout":
        cmd = ["timeout", "-s", "INT", "900", *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step      2/"):
            if how == "group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGTERM)  # timeout sends its -s signal on
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize("how", ["group", "timeout"])
def test_one_ctrl_c_to_the_documented_command_keeps_the_checkpoint(chain, tmp_path, how):  # noqa: F811
    """Defect 1: `uv run distill.py` (uv forwards the group's SIGINT to Python, which also got
    it) took the second delivery as "stop at once" and lost the checkpoint."""
    out = tmp_path / "d"
    cmd = script_cmd("distill.py", f"STUDENT={chain['student']}", f"DATASET={chain['data']}",
                     *FAST, "MAX_STEPS=2000", "EVAL_SAMPLES=0", f"OUTPUT={out}",
                     "_ABORT_LOSS_FACTOR=1e9")
    code, err = stop_at_step_two(cmd, how)
    lines = [x for x in err.splitlines() if x.strip() and "it/s]" not in x and "%|" not in x]
    assert code == 130, err
    assert lines[-1].startswith("interrupted: stopped after step") and "Traceback" not in err
    assert "stopped at once" not in err
    assert list((tmp_path / "d-checkpoints").glob("step-*"))


def test_a_signal_delivered_twice_is_one_request(chain, tmp_path, monkeypatch):  # noqa: F811
    """The same signal twice within common.REPEAT_WINDOW: a checkpoint, as for one."""
    real = distill.train_step

    def doubled(*args):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(distill, "train_step", doubled)
    with pytest.raises(common.Interrupted, match="stopped after step 1: checkpoint"):
        run_distill(chain["student"], chain["data"], tmp_path / "d", "MAX_STEPS=6")
    assert (tmp_path / "d-checkpoints" / "step-0000001").is_dir()


def signalled_first(fn, sig):
    """`fn`, called after this process received `sig` (a stop that arrives as `fn` starts)."""
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return fn(*args, **kwargs)
    return wrapped


def test_a_signal_during_the_final_write_finishes_it(chain, tmp_path, monkeypatch):  # noqa: F811
    """Defect 2: a stop while the output was written left neither output nor checkpoint."""
    monkeypatch.setattr(common, "write_checkpoint",
                        signalled_first(common.write_checkpoint, signal.SIGTERM))
    out = tmp_path / "d"
    s = run_distill(chain["student"], chain["data"], out, "MAX_STEPS=2")
    assert s["output"] == str(out) and (out / common.RECORD).is_file()
    assert common.read_record(out)["distill"]["steps"] == 2


def run_as_script(module, argv, monkeypatch):
    """`module` run by common.run as its script would be (signal handling included): its exit
    status."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    with pytest.raises(SystemExit) as e:
        common.run(module.main)
    return e.value.code


def test_sigterm_to_prune_is_one_interrupted_line(chain, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Defect 2: SIGTERM to importance or prune ended with exit 143 and no `interrupted:` line;
    the output is never half written."""
    monkeypatch.setattr(prune, "prune_one", signalled_first(prune.prune_one, signal.SIGTERM))
    out = tmp_path / "p"
    code = run_as_script(prune, [f"MODEL={chain['teacher']}", f"SCORES={chain['scores']}",
                                 f"DATASET={chain['data']}", "NUM_SAMPLES=2", "SEQ_LEN=32",
                                 "TARGET_FFN=48", f"OUTPUT={out}"], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1].startswith("interrupted:") and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is not common._on_signal  # handlers restored


def test_ctrl_c_during_a_cache_fill_says_what_it_kept(chain, tmp_path, monkeypatch):  # noqa: F811
    """Defect 2: Ctrl-C during a cache fill said "nothing was saved" although shards were kept."""
    real, calls = teacher_cache.write_shard, {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(teacher_cache, "write_shard", interrupted)
    cache = tmp_path / "cache"
    knobs, private = split_args([*FAST, "MAX_STEPS=4", "_CACHE_SHARD_ROWS=2", "TOPK=8",
                                 f"TEACHER_CACHE={cache}"])
    with pytest.raises(common.Interrupted, match="keeps the shards it completed"), \
            recipe(distill, **private):
        distill.main([f"STUDENT={chain['student']}", f"DATASET={chain['data']}",
                      f"OUTPUT={tmp_path / 'd'}", *knobs])
    assert len(list(cache.glob("*.safetensors"))) == 2  # the held-out rows' file and one shard
