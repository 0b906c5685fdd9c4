"""distill.py's teacher cache: the bucketed top-k KL, writing the cache (processes, kills,
mismatches) and training from it as from the live teacher."""

import shutil
import types
import subprocess

import pytest
import torch

import common
import distill
import teacher_cache
from conftest import ROOT, make_model, olmo3_config, recipe, script_cmd
from test_distill import launch_cmd, make_teacher, prune_like, run, write_student

VOCAB = 320  # the tiny models' vocabulary: TOPK=320 caches every logit


def cache_files(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


# ---- the loss -------------------------------------------------------------------------------

def random_case(n=40, h=12, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g,
                                                                                dtype=torch.float64)
    return h_s, w_s, h_t, w_t, torch.randint(0, v, (n,), generator=g)


def check_loss_and_grads(want, h_s, w_s, teacher, y, chunks, **kw):
    """logit_loss with `teacher` equals `want` and its gradients at every chunk size (float64);
    returns the last loss."""
    gh, gw = torch.autograd.grad(want, (h_s, w_s), retain_graph=True)
    for chunk in chunks:
        got, _ = distill.logit_loss(h_s, w_s, teacher, y, chunk=chunk, **kw)
        ch, cw = torch.autograd.grad(got, (h_s, w_s))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ch, gh, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(cw, gw, rtol=1e-9, atol=1e-12)
    return got


def test_cached_kl_with_every_logit_is_the_full_kl():
    """k = vocab: the cached loss and its gradients are the live full-logit ones (float64)."""
    h_s, w_s, h_t, w_t, y = random_case()
    want = distill.direct_logit_loss(h_s, w_s, h_t, w_t, y)
    ids, logp, rest = teacher_cache.topk_entries((h_t @ w_t.T).log_softmax(-1), w_t.shape[0])
    assert torch.isneginf(rest).all()
    check_loss_and_grads(want, h_s, w_s, ("topk", ids, logp, rest), y, (7, 64))


def bucketed_kl(z_s, lt, ids):
    """The same loss computed independently: both distributions summed into k + 1 buckets with
    an explicit mask, the KL written out, gradients by autograd."""
    p, q = z_s.softmax(-1), lt.exp()
    inside = torch.zeros_like(p, dtype=torch.bool).scatter(1, ids, True)
    pk, qk = p.gather(1, ids), q.gather(1, ids)
    p_rest, q_rest = (p * ~inside).sum(-1), (q * ~inside).sum(-1)
    kl = (qk * (qk.log() - pk.log())).sum(-1) + q_rest * (q_rest.log() - p_rest.log())
    return kl.mean()


@pytest.mark.parametrize("k", [1, 5, 40])
def test_cached_kl_is_the_bucketed_kl(k):
    h_s, w_s, h_t, w_t, y = random_case()
    lt = (h_t @ w_t.T).log_softmax(-1)
    ids, logp, rest = teacher_cache.topk_entries(lt, k)
    want = bucketed_kl(h_s @ w_s.T, lt, ids)
    got = check_loss_and_grads(want, h_s, w_s, ("topk", ids, logp, rest), y, (7, 40))
    # a KL of coarser distributions never exceeds the full one (data processing inequality)
    assert got.item() <= distill.direct_logit_loss(h_s, w_s, h_t, w_t, y).item() + 1e-12


def test_cached_evaluation_matches_the_live_one():
    teacher, student = make_model(olmo3_config(), seed=1), make_model(olmo3_config(), seed=2)
    rows = torch.randint(2, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    live = common.evaluate(student, rows, 2, teacher, 8)
    from accelerate import Accelerator
    targets = teacher_cache.teacher_topk(teacher, rows, VOCAB, 2, 8, torch.float32, Accelerator(cpu=True))
    targets.pop("row_hash")
    got = common.evaluate(student, rows, 2, chunk_tokens=8, cached=targets)
    assert got["tokens"] == live["tokens"]
    for key in ("kl", "student_ppl", "teacher_ppl"):
        assert got[key] == pytest.approx(live[key], rel=1e-5), key


# ---- writing the cache and training from it ---------------------------------------------------

def test_training_from_every_logit_is_the_live_training(student_dir, teacher_dir, text_file,
                                                        tmp_path, monkeypatch):
    """k = vocab in float32: the same losses step by step as with the live teacher (CPU); once
    the cache holds the rows, the teacher's files may be gone: it is never loaded."""
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    steps = ["MAX_STEPS=4", "_EVAL_EVERY=2", "_CACHE_DTYPE='float32'", "_CACHE_SHARD_ROWS=6"]
    live = run(student_dir, teacher, text_file, tmp_path / "live", f"TEACHER={teacher}", *steps)
    cache = tmp_path / "cache"
    first = run(student_dir, teacher, text_file, tmp_path / "first", f"TEACHER={teacher}",
                f"TEACHER_CACHE={cache}", f"TOPK={VOCAB}", *steps)
    assert first["losses"] == live["losses"]  # bit for bit
    assert first["final"]["kl"] == pytest.approx(live["final"]["kl"], rel=1e-5)
    assert first["final"]["teacher_ppl"] == pytest.approx(live["final"]["teacher_ppl"], rel=1e-5)
    manifest = teacher_cache.read_manifest(cache)
    assert manifest["rows"] == 18 and manifest["topk"] == VOCAB  # 4 steps x 4 rows, 6 a shard
    assert len(list(cache.glob("train-*.safetensors"))) == 3

    shutil.rmtree(teacher)
    monkeypatch.setattr(distill, "load_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    again = run(student_dir, teacher, text_file, tmp_path / "again", f"TEACHER_CACHE={cache}",
                f"TOPK={VOCAB}", *steps)
    assert again["losses"] == live["losses"]
    rec = common.read_record(tmp_path / "again")["distill"]
    assert rec["teacher"] == str(teacher) and rec["teacher_cache"]["topk"] == VOCAB
    # stopped and resumed from the cache: the same losses again
    out = tmp_path / "resumed"
    args = (student_dir, teacher, text_file, out, f"TEACHER_CACHE={cache}", f"TOPK={VOCAB}", *steps)
    with recipe(distill, _STOP_AT_STEP=2):
        assert run(*args)["output"] is None  # a checkpoint at step 2
    resumed = run(*args)
    assert resumed["losses"] == live["losses"][2:]
    # more rows than the cache holds need the teacher, which is gone: one clear error
    monkeypatch.undo()
    with pytest.raises(common.UserError, match="its teacher cannot be read"):
        run(student_dir, teacher, text_file, tmp_path / "longer", f"TEACHER_CACHE={cache}",
            f"TOPK={VOCAB}", *steps[1:], "MAX_STEPS=8")


def test_small_k_trains_and_stores_six_bytes_a_logit(student_dir, teacher_dir, text_file,
                                                     tmp_path):
    """k = 8 of 320 in float16: the cached KL falls, and so does the full KL to the live teacher."""
    cache = tmp_path / "cache"
    s = run(student_dir, teacher_dir, text_file, tmp_path / "out", f"TEACHER_CACHE={cache}",
            "TOPK=8", "MAX_STEPS=20", "_EVAL_EVERY=10", "_CHECKPOINT_EVERY=0")
    assert s["final"]["kl"] < 0.75 * s["start"]["kl"]
    from conftest import make_tokenizer
    rows = common.calibration_rows(text_file, make_tokenizer(), 4, 32, 0)
    teacher = common.load_model(teacher_dir, "cpu", torch.float32)
    full = [common.evaluate(common.load_model(m, "cpu", torch.float32), rows, 2, teacher)["kl"]
            for m in (student_dir, str(tmp_path / "out"))]
    assert full[1] < 0.9 * full[0] and s["final"]["kl"] <= full[1]  # bucketed: a lower bound
    from safetensors import safe_open
    with safe_open(str(cache / "train-000000.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        shape = f.get_slice("logp").get_shape()
    assert dtypes == {"ids": "I32", "logp": "F16", "rest": "F16", "target": "F16", "row_hash": "I64"}
    assert shape[2] == 8  # per token: 8 x (4 + 2) bytes, plus 2 + 2, plus 8 a row


def test_one_and_two_processes_write_the_same_cache(student_dir, teacher_dir, text_file,
                                                    tmp_path):
    """`accelerate launch` over 2 CPU processes: each writes its share, the files are those of
    one process; then a fill killed mid-write resumes to the same files."""
    args = [f"STUDENT={student_dir}", f"DATASET={text_file}", "SEQ_LEN=32", "BATCH_SIZE=2",
            "GLOBAL_BATCH=4", "EVAL_SAMPLES=4", "MAX_STEPS=3", "TOPK=16", "DEVICE=cpu",
            "_CACHE_SHARD_ROWS=2"]
    for n, cmd in (("one", script_cmd), ("two", launch_cmd)):
        done = subprocess.run(cmd("distill.py", *args, f"TEACHER_CACHE={tmp_path / n}",
                                  f"OUTPUT={tmp_path / (n + '-out')}") if n == "one" else
                              cmd(*args, f"TEACHER_CACHE={tmp_path / n}",
                                  f"OUTPUT={tmp_path / (n + '-out')}"),
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "bytes per token" in done.stdout
    one, two = cache_files(tmp_path / "one"), cache_files(tmp_path / "two")
    assert len(one) == 7 and one == two  # 6 training shards and the held-out rows


def test_a_killed_fill_resumes_to_the_same_files(student_dir, teacher_dir, text_file, tmp_path,
                                                 monkeypatch):
    args = ["TOPK=16", "MAX_STEPS=3", "_CACHE_SHARD_ROWS=2"]
    run(student_dir, teacher_dir, text_file, tmp_path / "ref",
        f"TEACHER_CACHE={tmp_path / 'ref-cache'}", *args)
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def killed(tensors, path, *a, **k):  # the third shard: half a file, then the kill
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise KeyboardInterrupt
        return real(tensors, path, *a, **k)
    cache = tmp_path / "cache"
    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(common.Interrupted, match="keeps the shards it completed"):
        run(student_dir, teacher_dir, text_file, tmp_path / "out", f"TEACHER_CACHE={cache}", *args)
    assert len(cache_files(cache)) == 2 and not list(cache.glob(".*"))  # whole files only
    (cache / ".train-000005.safetensors.tmp-999999999").write_bytes(b"\0")  # a SIGKILLed writer's
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run(student_dir, teacher_dir, text_file, tmp_path / "out", f"TEACHER_CACHE={cache}", *args)
    assert cache_files(cache) == cache_files(tmp_path / "ref-cache")
    assert not list(cache.glob(".*"))


def test_a_cache_of_other_rows_or_tokens_is_refused(student_dir, teacher_dir, text_file,
                                                    tmp_path, tokenizer):
    cache = tmp_path / "cache"
    base = [f"TEACHER_CACHE={cache}", "TOPK=8", "MAX_STEPS=2"]
    run(student_dir, teacher_dir, text_file, tmp_path / "out", *base)
    other = tmp_path / "other.txt"
    other.write_text(open(text_file).read().upper())

    def refused(*args, student=student_dir, data=text_file):
        with pytest.raises(common.UserError) as e:
            run(student, teacher_dir, data, tmp_path / "out2", *base, *args)
        return str(e.value)
    for args, name in ((["SEQ_LEN=16"], "SEQ_LEN"), (["_SEED=1"], "_SEED"), (["TOPK=4"], "TOPK"),
                       (["EVAL_SAMPLES=2"], "EVAL_SAMPLES")):
        assert name in refused(*args) and "TEACHER_CACHE" in refused(*args)
    assert "DATASET" in refused(data=str(other))
    # the same file name with other text in it: the rows' hashes tell
    edited = tmp_path / "edited"
    edited.mkdir()
    data = edited / "corpus.txt"
    shutil.copy(text_file, data)
    fresh = tmp_path / "fresh-cache"
    run(student_dir, teacher_dir, str(data), tmp_path / "out3", f"TEACHER_CACHE={fresh}", "TOPK=8",
        "MAX_STEPS=2")
    data.write_text(open(text_file).read().replace("fox", "cat"))
    with pytest.raises(common.UserError, match="other settings.*data_fingerprint"):
        run(student_dir, teacher_dir, str(data), tmp_path / "out4", f"TEACHER_CACHE={fresh}",
            "TOPK=8", "MAX_STEPS=2")  # the file's content, checked before anything loads
    manifest = teacher_cache.read_manifest(fresh)  # and, under it, each row's hash
    rows = common.row_stream(text_file, tokenizer, 32, 0, 4, common.start_position())
    rows = torch.stack([next(rows) for _ in range(4)])
    teacher_cache.TeacherCache(fresh, manifest).train_rows(0, rows)  # the rows it was written for
    rows[2, 5] += 1  # one token of other text
    with pytest.raises(common.UserError, match="holds other text"):
        teacher_cache.TeacherCache(fresh, manifest).train_rows(0, rows)
    # another tokenizer (same vocabulary size, other merges)
    odd = tmp_path / "odd-student"
    shutil.copytree(student_dir, odd)
    tok = common.load_tokenizer(str(odd))
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(odd)
    assert "tokenizer" in refused(student=str(odd))
    # a cache directory that is someone else's, or an input
    assert "not a teacher cache" in refused_path(student_dir, teacher_dir, text_file, tmp_path,
                                                 student_dir)
    assert "DATASET" in refused_path(student_dir, teacher_dir, text_file, tmp_path, text_file)


def refused_path(student, teacher, data, tmp_path, cache):
    with pytest.raises(common.UserError) as e:
        run(student, teacher, data, tmp_path / "out5", f"TEACHER_CACHE={cache}", "MAX_STEPS=2")
    return str(e.value)


def test_selection_and_depth_cut_from_a_cache(teacher_dir, text_file, tmp_path, monkeypatch,
                                              capsys):
    """Two candidates (one cut to half the layers: its hidden-state loss is dropped, said so)
    ranked from one cache, filled once; a second selection never loads the teacher."""
    teacher = make_teacher()
    shallow = write_student(teacher_dir, prune_like(teacher, [0, 3], ffn=48), [0, 3],
                            tmp_path / "shallow")
    narrow = write_student(teacher_dir, prune_like(teacher, [0, 1, 2, 3], ffn=32), [0, 1, 2, 3],
                           tmp_path / "narrow")
    args = [f"TEACHER_CACHE={tmp_path / 'cache'}", "TOPK=16", "MAX_STEPS=4", "SELECT_TOKENS=128",
            "_SELECT_FLAT=True"]
    s = run([shallow, narrow], teacher_dir, text_file, tmp_path / "sel", *args)
    assert "hidden-state loss, which a teacher cache cannot give" in capsys.readouterr().out
    assert s["selection"]["winner"] and len(s["selection"]["rounds"]) == 1
    monkeypatch.setattr(distill, "load_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    again = run([shallow, narrow], teacher_dir, text_file, tmp_path / "sel2", *args)
    assert ([c["kl"] for c in again["selection"]["candidates"]]
            == [c["kl"] for c in s["selection"]["candidates"]])


def test_a_fill_is_refused_before_the_teacher_runs(student_dir, teacher_dir, text_file, tmp_path,
                                                   monkeypatch):
    """What would fail later fails first: data edited since the cache's files were written, a
    disk too small for the rest, a checkpoint the run could not resume."""
    data = tmp_path / "corpus.txt"
    shutil.copy(text_file, data)
    cache = tmp_path / "cache"
    run(student_dir, teacher_dir, str(data), tmp_path / "out", f"TEACHER_CACHE={cache}", "TOPK=8",
        "MAX_STEPS=2", "_CACHE_SHARD_ROWS=4")
    monkeypatch.setattr(distill, "load_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    more = [f"TEACHER_CACHE={cache}", "TOPK=8", "MAX_STEPS=4", "_CACHE_SHARD_ROWS=4"]
    data.write_text(open(text_file).read().replace("fox", "cat"))
    with pytest.raises(common.UserError, match="other settings.*data_fingerprint"):
        run(student_dir, teacher_dir, str(data), tmp_path / "out2", *more)
    shutil.copy(text_file, data)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(common.UserError, match="GB free"):
        run(student_dir, teacher_dir, str(data), tmp_path / "out2", *more)
    monkeypatch.undo()
    with recipe(distill, _STOP_AT_STEP=1):  # a live run's checkpoint, then the cache added
        run(student_dir, teacher_dir, str(data), tmp_path / "live", "MAX_STEPS=4")
    monkeypatch.setattr(distill, "load_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    with pytest.raises(common.UserError, match="other settings"):
        run(student_dir, teacher_dir, str(data), tmp_path / "live", *more)
