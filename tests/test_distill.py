"""distill.py: the chunked loss against full logits, recovery, resume, hidden losses, processes."""

import json
import re
import shutil
import subprocess

import pytest
import torch

import common
import costs
import distill
from conftest import (ROOT, llama_config, make_model, make_tokenizer, olmo3_config, recipe,
                      script_cmd, split_args)

FAST = ["SEQ_LEN=32", "BATCH_SIZE=2", "GLOBAL_BATCH=4", "EVAL_SAMPLES=4", "LR=3e-3",
        "_MIN_LR=3e-4", "_WARMUP_STEPS=2", "_LOG_EVERY=1", "_CHUNK_TOKENS=16",
        "_EVAL_TASKS=[]"]  # the downstream suite: its own test (test_evaluate.py)


def prune_like(teacher, layers, ffn=None, hidden=None):
    """A student cut from `teacher` the way prune.py cuts one: kept layers, first `ffn` neurons,
    first `hidden` channels (enough for these tests; prune.py chooses them by importance)."""
    conf = teacher.config.to_dict()
    h = hidden or teacher.config.hidden_size
    f = ffn or teacher.config.intermediate_size
    kw = {k: conf[k] for k in ("vocab_size", "num_attention_heads", "num_key_value_heads",
                               "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                               "pad_token_id", "eos_token_id", "bos_token_id")}
    kw.update(hidden_size=h, intermediate_size=f, num_hidden_layers=len(layers),
              head_dim=common.head_dim(teacher.config))
    if teacher.config.model_type == "olmo3":
        types_ = common.layer_types(teacher.config)
        student = make_model(olmo3_config(**kw, sliding_window=conf["sliding_window"],
                                          layer_types=[types_[i] for i in layers]))
    else:
        student = make_model(llama_config(**kw))
    src = teacher.state_dict()
    new = {}
    for name, p in student.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        w = src[f"model.layers.{layers[int(m[1])]}.{m[2]}" if m else name]
        new[name] = w[tuple(slice(0, n) for n in p.shape)].clone()
    student.load_state_dict(new)
    return student


def write_student(teacher_dir, student, layers, path, hidden=None):
    student.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    t = common.load_config(teacher_dir)
    shape = lambda c: {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,  # noqa: E731
                       "num_hidden_layers": c.num_hidden_layers,
                       "num_attention_heads": c.num_attention_heads,
                       "num_key_value_heads": c.num_key_value_heads, "head_dim": common.head_dim(c)}
    kept = {"layers": list(layers), "hidden": list(range(hidden or t.hidden_size))}
    record = {"stage": "prune", "source_model": str(teacher_dir), "kept": kept,
              "source_shape": shape(t), "shape": shape(student.config), "config": {},
              "params": {}, "metrics": {}, "versions": common.versions()}
    (path / common.RECORD).write_text(json.dumps(record))
    return str(path)


def make_teacher():
    """A tiny random Olmo 3 with a confident output layer (a uniform one leaves nothing to learn)."""
    teacher = make_model(olmo3_config(), seed=3)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    return teacher


def run(student, teacher_dir, text_file, out, *args):
    """distill.main in-process; `_NAME=value` arguments set recipe constants for the run."""
    knobs, private = split_args([*FAST, *args])
    with recipe(distill, **private):
        return distill.main([f"STUDENT={student}", f"DATASET={text_file}", f"OUTPUT={out}", *knobs])


# ---- the loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,kl_w,ce_w", [(1.0, 1.0, 0.0), (2.0, 1.0, 0.5), (1.0, 0.0, 1.0)])
def test_chunked_loss_equals_full_logits(temperature, kl_w, ce_w):
    g = torch.Generator().manual_seed(0)
    n, h, ht, v = 50, 16, 24, 97
    h_s = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(n, ht, generator=g, dtype=torch.float64), torch.randn(v, ht, generator=g,
                                                                                 dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    want = distill.direct_logit_loss(h_s, w_s, h_t, w_t, y, temperature, kl_w, ce_w)
    gh, gw = torch.autograd.grad(want * 3, (h_s, w_s))
    for chunk in (7, 50, 64):
        got, stats = distill.logit_loss(h_s, w_s, ("logits", h_t, w_t), y, temperature, kl_w, ce_w, chunk)
        ch, cw = torch.autograd.grad(got * 3, (h_s, w_s))  # upstream gradient is applied
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ch, gh, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(cw, gw, rtol=1e-6, atol=1e-9)
        ce = torch.nn.functional.cross_entropy(h_s @ w_s.T, y, reduction="sum")
        assert stats[1].item() == pytest.approx(ce.item(), rel=1e-9)


def test_chunked_loss_float32_model_gradients():
    """Inside a real model (tied embeddings: the lm_head gradient adds to the embedding's)."""
    teacher, student = make_model(llama_config(), seed=1), make_model(llama_config(), seed=2)
    ids = torch.randint(2, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    h_t = common.final_hidden(teacher, ids)[:, :-1].flatten(0, 1).detach()
    y = ids[:, 1:].flatten()
    grads = []
    for chunked in (True, False):
        student.zero_grad()
        h_s = common.final_hidden(student, ids)[:, :-1].flatten(0, 1)
        if chunked:
            loss, _ = distill.logit_loss(h_s, student.lm_head.weight,
                                         ("logits", h_t, teacher.lm_head.weight), y, chunk=11)
        else:
            loss = distill.direct_logit_loss(h_s, student.lm_head.weight, h_t,
                                             teacher.lm_head.weight, y)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in student.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)


def test_hidden_loss_switch_and_mapping():
    assert not distill.use_hidden_loss(24, 32, 0.3) and distill.use_hidden_loss(22, 32, 0.3)
    assert distill.use_hidden_loss(16, 32, 0.5) and not distill.use_hidden_loss(32, 32, 0.0001)
    # 32 -> 16 keeping 0-15 (Minitron's depth recipe drops a contiguous late block)
    pairs = distill.hidden_pairs(list(range(16)), 32, 32, 4)
    assert pairs[0] == (0, 0) and len(pairs) == 5
    assert all(t == s for s, t in pairs)  # kept layer j is source layer j
    # keeping every other layer: student layer j's output is teacher layer 2j+1's output
    kept = list(range(1, 32, 2))
    assert distill.hidden_pairs(kept, 32, 32, 100) == [(0, 0)] + [(j + 1, kept[j] + 1)
                                                                 for j in range(15)]
    # a teacher twice as deep as the source: indices rescale
    assert distill.hidden_pairs([0, 2, 3], 4, 8, 5) == [(0, 0), (1, 2), (2, 6)]
    proj = distill.make_proj(3, 5, [4, 0, 2])
    assert torch.equal(proj(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[2.0, 0, 3, 0, 1]]))


@pytest.mark.parametrize("make_config", [olmo3_config, llama_config])
def test_flops_per_token_matches_counted_matmuls(make_config):
    """The MFU numerator: 3 x forward_flops_per_token is what torch counts for a training step
    (within 2%: the formula also counts 2 FLOPs per norm weight)."""
    from torch.utils.flop_counter import FlopCounterMode
    config = make_config()
    model = make_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    counted = counter.get_total_flops() / ids.numel()
    assert 3 * costs.forward_flops_per_token(config, 24) == pytest.approx(counted, rel=0.02)
    no_head = costs.forward_flops_per_token(config, 24, lm_head=False)  # teacher without KL
    assert costs.forward_flops_per_token(config, 24) - no_head == 2 * 320 * 64
    assert costs.peak_tflops("cpu", None) is None and costs.peak_tflops("cpu", 100) == 100.0


@pytest.mark.parametrize("make_config", [olmo3_config, llama_config])
def test_hidden_states_hooks_match_output_hidden_states(make_config):
    model = make_model(make_config())
    ids = torch.randint(0, 320, (2, 12))
    n = model.config.num_hidden_layers
    with distill.hidden_states(model, list(range(n))) as got:
        ref = model.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    assert sorted(got) == list(range(n))
    assert all(torch.equal(got[i], ref[i]) for i in range(n))  # the last one, normed, is not used
    model.model(input_ids=ids.flip(0), use_cache=False)  # other inputs: the hooks are gone
    assert all(torch.equal(got[i], ref[i]) for i in range(n))


def test_state_memory_estimate_counts_the_real_parameters():
    student, teacher = make_model(llama_config(intermediate_size=48)), make_model(olmo3_config())
    n_s = sum(p.numel() for p in student.parameters())  # tied: the embedding counted once
    n_t = sum(p.numel() for p in teacher.parameters())
    one = costs.state_gib(student.config, teacher.config, torch.bfloat16, 1)
    assert one["student"] * 2**30 == 16 * n_s and one["teacher"] * 2**30 == 2 * n_t
    two = costs.state_gib(student.config, teacher.config, torch.bfloat16, 2)
    head = 320 * 64 * 2  # the teacher's lm_head stays whole on every process
    assert two["student"] * 2**30 == 8 * n_s
    assert two["teacher"] * 2**30 == pytest.approx((2 * n_t - head) / 2 + head)


def test_packed_rows_match_calibration_rows(tokenizer, text_file):
    rows = common.calibration_rows(text_file, tokenizer, 5, 16, 0)
    stream = common.packed_rows(text_file, tokenizer, 16, 0)
    assert torch.equal(torch.stack([next(stream) for _ in range(5)]), rows)


class CountingTokenizer:
    """A tokenizer that counts how many texts it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_row_stream_holds_out_repeats_and_resumes(tokenizer, text_file):
    every = list(common.packed_rows(text_file, tokenizer, 64, 0))
    pos = common.start_position()
    stream = common.row_stream(text_file, tokenizer, 64, 0, 3, pos)
    train = every[3:]
    want = train + train + train
    saved = {}
    for i in range(len(want)):
        assert torch.equal(next(stream), want[i])
        saved[i + 1] = json.loads(json.dumps(pos))  # as a checkpoint stores it
    assert saved[len(train) + 2]["epoch"] == 1 and saved[len(train) + 2]["row"] == 3 + 2
    # resuming after k rows gives row k next, tokenizing only the documents that row needs
    for k in (1, 7, len(train) - 1, len(train), len(train) + 2, 2 * len(train) + 4):
        tok = CountingTokenizer(tokenizer)
        pos = json.loads(json.dumps(saved[k]))
        later = common.row_stream(text_file, tok, 64, 0, 3, pos)
        assert torch.equal(next(later), want[k % len(want)])
        if pos["epoch"] == saved[k]["epoch"]:
            assert tok.calls == pos["documents"] - saved[k]["documents"] <= 2, k
        assert pos == saved[k + 1]


def test_packed_rows_skip_hub_documents_untokenized(tokenizer, monkeypatch):
    """A hub stream resumes by skipping documents in the seeded shuffled order."""
    import datasets
    docs = [{"text": f"document {i} " + "word " * (i % 7)} for i in range(40)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(
        docs).to_iterable_dataset(num_shards=4))
    full_pos = {"documents": 0, "carry": []}
    full = list(common.packed_rows("some/hub-dataset", tokenizer, 8, 0, full_pos))
    assert [d["text"] for d in common.documents("some/hub-dataset", 0)] != [d["text"] for d in docs]
    for k in (1, 5, len(full) - 2):
        pos = {"documents": 0, "carry": []}
        rows = common.packed_rows("some/hub-dataset", tokenizer, 8, 0, pos)
        for _ in range(k):
            next(rows)
        tok = CountingTokenizer(tokenizer)
        resumed = list(common.packed_rows("some/hub-dataset", tok, 8, 0, dict(pos)))
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[k:], strict=True))
        assert tok.calls == 40 - pos["documents"]


# ---- runs -----------------------------------------------------------------------------------

def test_kl_falls_and_output(student_dir, teacher_dir, text_file, tmp_path):
    out = tmp_path / "distilled"
    s = run(student_dir, teacher_dir, text_file, out, "MAX_STEPS=20", "_EVAL_EVERY=10",
            "_CHECKPOINT_EVERY=0")
    assert s["finished"] and s["steps"] == 20 and s["tokens"] == 20 * 4 * 32
    assert s["final"]["kl"] < 0.75 * s["start"]["kl"]
    assert s["tflops_per_device"] > 0 and s["mfu"] is None and s["peak_memory_gib"] > 0.1
    assert sum(s["losses"][-5:]) < sum(s["losses"][:5])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 48 and model.config.head_dim == 16
    assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert AutoTokenizer.from_pretrained(out).chat_template
    rec = common.read_record(out)
    assert rec["stage"] == "distill" and rec["kept"]["layers"] == [0, 1, 2, 3]
    d = rec["distill"]
    assert d["tokens_seen"] == 20 * 4 * 32 and d["teacher"] == teacher_dir
    assert d["metrics"]["final"]["kl"] == pytest.approx(s["final"]["kl"])
    assert d["hidden_loss_pairs"] == [] and d["config"]["MAX_STEPS"] == 20
    assert d["throughput"]["tokens_per_s"] == pytest.approx(s["tokens_per_s"])
    # the saved model gives the final metrics again
    rows = common.calibration_rows(text_file, make_tokenizer(), 4, 32, 0)
    again = common.evaluate(model, rows, 2, common.load_model(teacher_dir, "cpu", torch.float32))
    assert again["kl"] == pytest.approx(s["final"]["kl"], rel=1e-4)


def test_kill_and_resume_is_bit_identical(student_dir, teacher_dir, text_file, tmp_path):
    common_args = ["MAX_STEPS=7", "_CHECKPOINT_EVERY=2", "_KEEP_CHECKPOINTS=2", "_EVAL_EVERY=100"]
    full = run(student_dir, teacher_dir, text_file, tmp_path / "a", *common_args)
    part = run(student_dir, teacher_dir, text_file, tmp_path / "b", *common_args, "_STOP_AT_STEP=5")
    assert not part["finished"] and part["output"] is None and not (tmp_path / "b").exists()
    ckpts = tmp_path / "b-checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["pare.json", "step-0000004",
                                                       "step-0000005"]  # the last 2, marked
    assert part["losses"] == full["losses"][:5]
    with pytest.raises(common.UserError, match="other settings"):
        run(student_dir, teacher_dir, text_file, tmp_path / "b", "MAX_STEPS=7", "LR=1e-3")
    # killed after step 5, before its checkpoint was complete: resume from step 4
    shutil.rmtree(ckpts / "step-0000005")
    (ckpts / ".step-0000006.tmp").mkdir()  # a half-written checkpoint is ignored
    rest = run(student_dir, teacher_dir, text_file, tmp_path / "b", *common_args)
    assert rest["losses"] == full["losses"][4:]  # bit-identical on CPU
    assert rest["tokens"] == full["tokens"] and rest["start"] == full["start"]
    a = common.load_model(str(tmp_path / "a"), "cpu", torch.float32).state_dict()
    b = common.load_model(str(tmp_path / "b"), "cpu", torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpts.exists()  # finished: a rerun starts afresh, with any settings


def test_hidden_loss_on_when_depth_cut(teacher_dir, text_file, tmp_path, capsys):
    teacher = make_teacher()
    layers = [0, 3]  # 4 -> 2 layers (50% cut), hidden 64 -> 48: a trainable map
    student = write_student(teacher_dir, prune_like(teacher, layers, hidden=48), layers,
                            tmp_path / "deep", hidden=48)
    run(student, teacher_dir, text_file, tmp_path / "out", "MAX_STEPS=3", "EVAL_SAMPLES=0",
        "_CHECKPOINT_EVERY=0")
    printed = capsys.readouterr().out
    assert "hidden_loss: on, (student, teacher) hidden states [(0, 0), (1, 1)]" in printed
    assert re.search(r"^memory: about [0-9.]+ GiB per process", printed, re.M)
    hid = [float(m) for m in re.findall(r"\| hid ([0-9.]+)", printed)]
    assert len(hid) == 3 and all(h > 0 for h in hid)
    assert common.read_record(tmp_path / "out")["distill"]["hidden_loss_pairs"] == [[0, 0], [1, 1]]
    # the same student with a high threshold: off
    run(student, teacher_dir, text_file, tmp_path / "out2", "MAX_STEPS=1", "EVAL_SAMPLES=0",
        "_CHECKPOINT_EVERY=0", "_HIDDEN_LOSS_DEPTH_CUT=0.6")
    assert "hidden_loss: off" in capsys.readouterr().out


def test_plain_ce_and_divergence_abort(student_dir, teacher_dir, text_file, tmp_path):
    s = run(student_dir, teacher_dir, text_file, tmp_path / "ce", "MAX_STEPS=2", "_KL_WEIGHT=0.0",
            "_CE_WEIGHT=1.0", "_CHECKPOINT_EVERY=0", "EVAL_SAMPLES=0")
    assert s["finished"] and s["losses"][0] > 1.0  # cross-entropy of a random model, in nats
    with pytest.raises(common.UserError, match="loss exploded|diverged"):
        run(student_dir, teacher_dir, text_file, tmp_path / "boom", "MAX_STEPS=20", "LR=1e3",
            "_MIN_LR=1e3", "_WARMUP_STEPS=0", "_GRAD_CLIP=1e9", "_CHECKPOINT_EVERY=0", "EVAL_SAMPLES=0")
    assert not (tmp_path / "boom").exists()


# ---- bad input: one clear error, nothing written ------------------------------------------

def test_bad_inputs(student_dir, teacher_dir, text_file, tmp_path):
    def bad(*args):
        out = tmp_path / "out"
        knobs, private = split_args([*FAST, "MAX_STEPS=1", *args])
        with pytest.raises(common.UserError) as e, recipe(distill, **private):
            distill.main([f"DATASET={text_file}", f"OUTPUT={out}", *knobs])
        assert not out.exists() and not (tmp_path / "out-checkpoints").exists()
        return str(e.value)

    ok = f"STUDENT={student_dir}"
    assert "run prune.py first" in bad(f"STUDENT={tmp_path / 'nowhere'}")
    assert "cannot load the teacher" in bad(ok, f"TEACHER={tmp_path / 'nowhere'}")
    bare = tmp_path / "bare"
    shutil.copytree(student_dir, bare)
    (bare / common.RECORD).unlink()
    assert "set TEACHER" in bad(f"STUDENT={bare}")
    # a teacher with one extra token: the token ids would not line up
    other = tmp_path / "other"
    make_model(olmo3_config(), seed=4).save_pretrained(other)
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(other)
    assert "do not share a tokenizer" in bad(ok, f"TEACHER={other}")
    bigger = tmp_path / "bigger"
    make_model(olmo3_config(vocab_size=400), seed=4).save_pretrained(bigger)
    make_tokenizer().save_pretrained(bigger)
    assert "vocab_size differs" in bad(ok, f"TEACHER={bigger}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "fewer than one row" in bad(ok, f"DATASET={empty}")
    assert "no rows" in bad(ok, "EVAL_SAMPLES=100000")
    assert "not a multiple" in bad(ok, "GLOBAL_BATCH=5")
    assert "at least 1" in bad(ok, "BATCH_SIZE=0")
    assert "nothing to train" in bad(ok, "_KL_WEIGHT=0.0")
    assert "_MIN_LR" in bad(ok, "LR=1e-6")
    assert "several processes" in bad(ok, "FSDP=True")  # nothing to shard over


# ---- as users run it: subprocesses --------------------------------------------------------

def launch_cmd(*args):
    """`accelerate launch` of distill.py on 2 CPU processes (recipe constants via patched.py)."""
    cmd = script_cmd("distill.py", *args)
    at = next(i for i, a in enumerate(cmd) if a.endswith((".py")))
    # on a machine without GPUs, `--multi_gpu` is what starts torchrun (gloo on CPU);
    # `--cpu --num_processes 2` would need MPI and silently runs one process
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd[:at] + (launch if shutil.which("uv") else ["-m", *launch]) + cmd[at:]


def logged_losses(text):
    return [float(x) for x in re.findall(r"^step +\d+/\d+ \| loss ([0-9.]+)", text, re.M)]


def test_end_to_end_and_two_processes(student_dir, teacher_dir, text_file, tmp_path):
    """`uv run distill.py` and `accelerate launch --multi_gpu --num_processes 2` (CPU) as a user
    types them; the two-process loss trajectory matches the one-process one."""
    args = [f"STUDENT={student_dir}", f"DATASET={text_file}", *FAST, "MAX_STEPS=6",
            "_CHECKPOINT_EVERY=3", "_EVAL_EVERY=3", "DEVICE=cpu"]
    one = subprocess.run(script_cmd("distill.py", *args, f"OUTPUT={tmp_path / 'one'}"), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(launch_cmd(*args, f"OUTPUT={tmp_path / 'two'}"),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = logged_losses(one.stdout), logged_losses(two.stdout)
    assert len(l1) == len(l2) == 6
    assert l2 == pytest.approx(l1, abs=2e-4)
    assert "= 2 processes x 1 micro-batches x 2 rows" in two.stdout, two.stdout
    assert two.stdout.count("config:") == 1  # printed by the first process only
    for out in ("one", "two"):
        rec = common.read_record(tmp_path / out)
        assert rec["distill"]["steps"] == 6
        assert re.search(r"^final_kl: [0-9.]+$", (one if out == "one" else two).stdout, re.M)
    assert rec["distill"]["processes"] == 2


def test_fsdp_two_processes_shard_and_resume(student_dir, teacher_dir, text_file, tmp_path):
    """FSDP=True over two CPU processes: each holds half of every model, gradient accumulation
    and a stop-and-resume through the sharded checkpoint follow the one-process run."""
    args = ["MAX_STEPS=6", "GLOBAL_BATCH=8", "_CHECKPOINT_EVERY=3", "_EVAL_EVERY=3"]
    ref = run(student_dir, teacher_dir, text_file, tmp_path / "ref", *args)
    launch = [f"STUDENT={student_dir}", f"DATASET={text_file}", *FAST, *args, "DEVICE=cpu",
              "FSDP=True", f"OUTPUT={tmp_path / 'fsdp'}"]
    part = subprocess.run(launch_cmd(*launch, "_STOP_AT_STEP=4"), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert part.returncode == 0, part.stderr[-3000:]
    held = re.search(r"holds ([\d,]+) of ([\d,]+) student parameters and ([\d,]+) of ([\d,]+) "
                     r"teacher", part.stdout)
    mine_s, all_s, mine_t, all_t = (int(g.replace(",", "")) for g in held.groups())
    assert mine_s == all_s // 2 and mine_t == all_t // 2  # every tensor here splits evenly
    assert "= 2 processes x 2 micro-batches x 2 rows" in part.stdout
    ckpt = tmp_path / "fsdp-checkpoints" / "step-0000004"
    assert {p.name for p in ckpt.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert not (tmp_path / "fsdp").exists()
    with pytest.raises(common.UserError, match="written with FSDP=True"):  # one process, no FSDP
        run(student_dir, teacher_dir, text_file, tmp_path / "fsdp", *args)
    rest = subprocess.run(launch_cmd(*launch), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resume:" in rest.stdout and "step-0000004" in rest.stdout
    losses = logged_losses(part.stdout) + logged_losses(rest.stdout)
    assert losses == pytest.approx(ref["losses"], abs=2e-4) and len(losses) == 6
    final = float(re.search(r"^final_kl: ([0-9.]+)$", rest.stdout, re.M)[1])
    assert final == pytest.approx(ref["final"]["kl"], abs=2e-4)
    a = common.load_model(str(tmp_path / "ref"), "cpu", torch.float32).state_dict()
    b = common.load_model(str(tmp_path / "fsdp"), "cpu", torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert common.read_record(tmp_path / "fsdp")["distill"]["fsdp"] is True


def test_fsdp_tied_gqa_with_hidden_loss(text_file, tmp_path):
    """FSDP on a Llama with tied embeddings and GQA, cut in depth and width so that the
    hidden-state loss and its trainable map are sharded too: same losses and weights as one
    process."""
    def teacher():
        t = make_model(llama_config(), seed=3)
        with torch.no_grad():
            t.lm_head.weight.mul_(10)  # tied: the embeddings too
        return t
    from conftest import save_model
    t_dir = save_model(teacher(), tmp_path / "teacher")
    student = write_student(t_dir, prune_like(teacher(), [0, 2], hidden=48), [0, 2],
                            tmp_path / "student", hidden=48)
    args = [f"STUDENT={student}", f"DATASET={text_file}", *FAST, "MAX_STEPS=4",
            "_CHECKPOINT_EVERY=0", "_EVAL_EVERY=4"]
    knobs, private = split_args(args)
    with recipe(distill, **private):
        ref = distill.main([*knobs, f"OUTPUT={tmp_path / 'ref'}"])
    two = subprocess.run(launch_cmd(*args, "DEVICE=cpu", "FSDP=True", f"OUTPUT={tmp_path / 'fsdp'}"),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "hidden_loss: on" in two.stdout and "holds" in two.stdout
    assert ref["losses"][0] > 0.1  # something to learn
    assert logged_losses(two.stdout) == pytest.approx(ref["losses"], abs=2e-4)
    a = common.load_model(str(tmp_path / "ref"), "cpu", torch.float32)
    b = common.load_model(str(tmp_path / "fsdp"), "cpu", torch.float32)
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()  # still tied
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    assert not torch.allclose(sb["model.embed_tokens.weight"],
                              common.load_model(student, "cpu", torch.float32).model.embed_tokens.weight)


def test_pipeline_by_defaults(teacher_dir, text_file, tmp_path, monkeypatch):
    """importance_analysis.py -> prune.py -> distill.py as the README runs them: each stage finds
    the previous one's output at its default path (here under a fresh working directory)."""
    import importance_analysis
    import prune
    monkeypatch.chdir(tmp_path)
    data = [f"DATASET={text_file}", "SEQ_LEN=32"]
    importance_analysis.main([f"MODEL={teacher_dir}", *data, "NUM_SAMPLES=4", "LOSS_SAMPLES=2"])
    prune.main([f"MODEL={teacher_dir}", *data, "NUM_SAMPLES=2", "TARGET_FFN=48",
                "TARGET_HIDDEN=48"])
    with recipe(distill, _CHECKPOINT_EVERY=0, _WARMUP_STEPS=1):
        s = distill.main([*data, "BATCH_SIZE=2", "GLOBAL_BATCH=2", "MAX_STEPS=3", "EVAL_SAMPLES=2"])
    assert s["finished"] and s["output"] == "out/distilled"
    rec = common.read_record(tmp_path / "out" / "distilled")
    assert rec["source_model"] == teacher_dir and rec["distill"]["teacher"] == teacher_dir
    assert rec["shape"]["intermediate_size"] == 48 and rec["distill"]["steps"] == 3


def test_activation_checkpointing_same_losses(student_dir, teacher_dir, text_file, tmp_path):
    args = ["MAX_STEPS=2", "EVAL_SAMPLES=0", "_CHECKPOINT_EVERY=0"]
    plain = run(student_dir, teacher_dir, text_file, tmp_path / "a", *args)
    ckpt = run(student_dir, teacher_dir, text_file, tmp_path / "b", *args,
               "GRADIENT_CHECKPOINTING=True")
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
