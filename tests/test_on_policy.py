"""distill.py's on-policy mode: reverse KL and JSD chunked losses, sampled rows and their loss
mask, exact resume, prompts from text and chat data, and the refusals before training."""

import json
import re
import subprocess

import pytest
import torch

import common
import distill
import on_policy
from conftest import ROOT, make_model, make_tokenizer, olmo3_config, recipe
from test_cache import check_loss_and_grads
from test_distill import launch_cmd, logged_losses, run


# ---- the losses -------------------------------------------------------------------------------

def dense_divergence(z_s, z_t, divergence, temperature, beta=0.5):
    """Reverse KL or generalized JSD, written out on full logits, mean over tokens, times T^2."""
    ls, lt = (z_s / temperature).log_softmax(-1), (z_t / temperature).log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "reverse_kl":
        d = (ps * (ls - lt)).sum(-1)
    else:
        lm = (beta * pt + (1 - beta) * ps).log()
        d = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    return temperature ** 2 * d.mean()


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,ce_w", [(1.0, 0.0), (2.0, 0.5)])
def test_student_side_divergences_equal_a_dense_computation(divergence, temperature, ce_w):
    g = torch.Generator().manual_seed(0)
    n, h, v = 45, 12, 61
    h_s = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g,
                                                                                dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    z_s = h_s @ w_s.T
    want = (dense_divergence(z_s, h_t @ w_t.T, divergence, temperature)
            + ce_w * torch.nn.functional.cross_entropy(z_s, y))
    check_loss_and_grads(want, h_s, w_s, ("logits", h_t, w_t), y, (7, 64),
                         temperature=temperature, ce_w=ce_w, divergence=divergence)


# ---- sampled rows -------------------------------------------------------------------------------

def test_sampled_rows_mask_only_the_sampled_tokens(monkeypatch):
    """Rows are prompt + sampled tokens up to and with the first eos + padding; the mask marks
    exactly the predictions of the sampled tokens, and the loss ignores prompt and padding."""
    student = make_model(olmo3_config(), seed=2)
    eos, pad = [0], 1
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    # what generate returns (left-padded prompts, then new tokens): row 0 ends at an eos
    canned = torch.tensor([[5, 6, 7, 20, 0, 30, 31, 32], [pad, 8, 9, 40, 41, 42, 43, 44]])
    monkeypatch.setattr(student, "generate", lambda **kw: canned)
    from accelerate import Accelerator
    rows, mask, n = on_policy.sample_rows(student, prompts, 8, eos, pad, Accelerator(cpu=True), 1.0)
    assert rows.tolist() == [[5, 6, 7, 20, 0, 1, 1, 1], [8, 9, 40, 41, 42, 43, 44, 1]]
    assert mask.tolist() == [[False, False, True, True, False, False, False],
                             [False, True, True, True, True, True, False]]
    assert n == 2 + 5

    teacher = make_model(olmo3_config(), seed=1)
    model = distill.Distiller(student, torch.nn.Identity(), [], distill.LossSettings(
        temperature=1.0, kl_weight=1.0, ce_weight=0.0, chunk=4, divergence="reverse_kl"))

    def loss(ids):
        h_t = common.final_hidden(teacher, ids)[:, :-1].flatten(0, 1).detach()
        return model(ids, ("logits", h_t, teacher.lm_head.weight), {}, mask)[0]
    with torch.no_grad():
        h_s = common.final_hidden(student, rows)[:, :-1].flatten(0, 1)
        h_t = common.final_hidden(teacher, rows)[:, :-1].flatten(0, 1)
        keep = mask.flatten()
        want = dense_divergence(student.lm_head(h_s[keep]), teacher.lm_head(h_t[keep]),
                                "reverse_kl", 1.0)
    torch.testing.assert_close(loss(rows), want.float(), rtol=1e-5, atol=1e-6)
    other = rows.clone()
    other[0, 5:] = 77  # other padding after the eos
    torch.testing.assert_close(loss(other), loss(rows))


# ---- runs -----------------------------------------------------------------------------------------

def test_a_tiny_share_of_sampling_leaves_the_off_policy_losses(student_dir, teacher_dir,
                                                                text_file, tmp_path):
    """ON_POLICY so small that no step samples: the prompts and their stream disturb neither the
    rows nor the RNG, so the losses are today's off-policy ones, bit for bit."""
    assert not any(on_policy.is_sampled_step(s, 1e-9, distill._SEED) for s in range(1, 5))
    off = run(student_dir, teacher_dir, text_file, tmp_path / "off", "MAX_STEPS=4")
    tiny = run(student_dir, teacher_dir, text_file, tmp_path / "tiny", "MAX_STEPS=4",
               "ON_POLICY=1e-9")
    assert tiny["losses"] == off["losses"] and tiny["sampling"]["steps"] == 0


def test_on_policy_kill_and_resume_is_bit_identical(student_dir, teacher_dir, text_file, tmp_path):
    draws = [on_policy.is_sampled_step(s, 0.5, distill._SEED) for s in range(1, 7)]
    assert any(draws) and not all(draws)  # both kinds of step in the run
    args = ["MAX_STEPS=6", "ON_POLICY=0.5", "DIVERGENCE=reverse_kl", "_CHECKPOINT_EVERY=0"]
    whole = run(student_dir, teacher_dir, text_file, tmp_path / "whole", *args)
    assert whole["sampling"]["steps"] == sum(draws) and whole["sampling"]["tokens"] > 0
    assert 0 < whole["sampling"]["share_of_step_time"] < 1
    with recipe(distill, _STOP_AT_STEP=3):
        assert run(student_dir, teacher_dir, text_file, tmp_path / "cut", *args)["output"] is None
    resumed = run(student_dir, teacher_dir, text_file, tmp_path / "cut", *args)
    assert resumed["losses"] == whole["losses"][3:]
    assert resumed["final"]["kl"] == whole["final"]["kl"]
    rec = common.read_record(tmp_path / "whole")["distill"]
    assert rec["config"]["ON_POLICY"] == 0.5 and rec["throughput"]["sampling"]["steps"] == sum(draws)


GEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_student(student_dir, tmp_path):
    import shutil
    path = tmp_path / "chat-student"
    shutil.copytree(student_dir, path)
    tok = make_tokenizer()
    tok.chat_template = GEN_TEMPLATE
    tok.save_pretrained(path)
    return str(path)


def chat_data(tmp_path, records, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in records))
    return str(path)


def conversation(i):
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What does pruning remove? ({i})"},
            {"role": "assistant", "content": "The neurons that matter least."},
            {"role": "user", "content": "And distillation?"},
            {"role": "assistant", "content": "It repairs the rest from the teacher's logits."}]


def test_chat_prompts_end_at_the_last_user_turn(student_dir, teacher_dir, tmp_path, text_file):
    student = chat_student(student_dir, tmp_path)
    tok = common.load_tokenizer(student)
    ids = on_policy.prompt_ids({"messages": conversation(0)}, tok, 128, 0, distill._PROMPT_SHARE)
    want = tok.apply_chat_template(conversation(0)[:4], tokenize=False) + "<|im_start|>assistant\n"
    assert tok.decode(ids) == want
    text = on_policy.prompt_ids("The quick brown fox jumps over the lazy dog. " * 5, tok, 32, 0,
                              distill._PROMPT_SHARE)
    assert len(text) == 16  # _PROMPT_SHARE of SEQ_LEN
    data = chat_data(tmp_path, [conversation(i) for i in range(40)])
    s = run(student, teacher_dir, data, tmp_path / "out", "MAX_STEPS=3", "ON_POLICY=1.0",
            "DIVERGENCE=jsd", "SEQ_LEN=128")
    assert s["sampling"]["steps"] == 3 and s["finished"]


def test_on_policy_refusals_come_before_loading(student_dir, teacher_dir, text_file, tmp_path,
                                                monkeypatch):
    student = chat_student(student_dir, tmp_path)
    no_user = chat_data(tmp_path, [[{"role": "system", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]] * 30, "nouser.jsonl")
    long = chat_data(tmp_path, [[{"role": "user", "content": "pruning " * 200}]] * 30, "long.jsonl")
    short_ctx = tmp_path / "short-ctx"
    import shutil
    shutil.copytree(student_dir, short_ctx)
    conf = json.loads((short_ctx / "config.json").read_text())
    conf["max_position_embeddings"] = 16
    (short_ctx / "config.json").write_text(json.dumps(conf))
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))

    def refused(*args, who=student_dir, data=text_file):
        with pytest.raises(common.UserError) as e:
            run(who, teacher_dir, data, tmp_path / "out", "MAX_STEPS=2", *args)
        return str(e.value)
    assert "no user turn" in refused("ON_POLICY=1.0", who=student, data=no_user)
    assert "no room to sample" in refused("ON_POLICY=1.0", who=student, data=long)
    assert "max_position_embeddings" in refused("ON_POLICY=0.5", who=str(short_ctx))
    assert "FSDP=False" in refused("ON_POLICY=0.5", "FSDP=True")
    assert "live teacher" in refused("ON_POLICY=0.5", f"TEACHER_CACHE={tmp_path / 'c'}")
    assert "forward KL only" in refused("DIVERGENCE=reverse_kl", f"TEACHER_CACHE={tmp_path / 'c'}")
    assert "between 0 and 1" in refused("ON_POLICY=1.5")
    assert "DIVERGENCE" in refused("DIVERGENCE=kl")
    assert "_KL_WEIGHT" in refused("ON_POLICY=1.0", "_KL_WEIGHT=0.0", "_CE_WEIGHT=1.0")


def test_on_policy_two_processes(student_dir, teacher_dir, text_file, tmp_path):
    """`accelerate launch` over 2 CPU processes: each samples its share of the rows."""
    args = [f"STUDENT={student_dir}", f"DATASET={text_file}", "SEQ_LEN=32", "BATCH_SIZE=2",
            "GLOBAL_BATCH=4", "EVAL_SAMPLES=4", "MAX_STEPS=3", "ON_POLICY=1.0",
            "DIVERGENCE=reverse_kl", "DEVICE=cpu", f"OUTPUT={tmp_path / 'two'}"]
    done = subprocess.run(launch_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(logged_losses(done.stdout)) == 3 and done.stdout.count("| sampled") == 3
    assert re.search(r"^sampled_tokens_per_s: [0-9.]+$", done.stdout, re.M)
    assert common.read_record(tmp_path / "two")["distill"]["processes"] == 2


def test_prompts_that_cannot_be_made_are_skipped_during_training(student_dir, tmp_path, capsys):
    """Checked strictly for the first step (before loading); later, an odd record is skipped
    with a warning instead of stopping a long run for good."""
    student = chat_student(student_dir, tmp_path)
    tok = common.load_tokenizer(student)
    records = [conversation(0), [{"role": "assistant", "content": "no question"}], conversation(1)]
    data = chat_data(tmp_path, records)
    got = on_policy.prompt_stream(data, tok, 128, 0, on_policy.start(0), distill._PROMPT_SHARE,
                                  strict=False)
    prompts = [next(got) for _ in range(4)]
    assert len({len(p) for p in prompts}) == 1  # the two good conversations, twice
    assert "skipped: DATASET document" in capsys.readouterr().out
    strict = on_policy.prompt_stream(data, tok, 128, 0, on_policy.start(0), distill._PROMPT_SHARE)
    with pytest.raises(common.UserError, match="no user turn"):
        [next(strict) for _ in range(3)]
