"""common.py: data loading and packing, chunked metrics, atomic checkpoints."""

import json
import math
import time
from pathlib import Path

import pytest
import torch

import common
from conftest import make_model, olmo3_config


def test_rows_are_packed_deterministic_and_use_the_chat_template(tokenizer, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"question {i} about pruning"},
                           {"role": "assistant", "content": f"answer {i}: keep the top heads"}]}
             for i in range(40)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in chats))
    rows = common.calibration_rows(str(path), tokenizer, 5, 16, seed=3)
    assert rows.shape == (5, 16)
    assert torch.equal(rows, common.calibration_rows(str(path), tokenizer, 5, 16, seed=3))
    assert not torch.equal(rows, common.calibration_rows(str(path), tokenizer, 5, 16, seed=4))
    text = tokenizer.decode(rows.flatten())
    assert "<|im_start|>user" in text and "<|endoftext|>" in text  # template, EOS between docs
    # asking for more rows than the data holds gives what there is
    assert len(common.calibration_rows(str(path), tokenizer, 10_000, 16, seed=3)) < 10_000


def test_parquet_text_and_errors(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["pruning keeps the heads that matter"] * 30}), path)
    assert common.calibration_rows(str(path), tokenizer, 2, 8, seed=0).shape == (2, 8)
    pq.write_table(pa.table({"body": ["x"] * 3}), path)
    with pytest.raises(common.UserError, match="'messages' or 'text'"):
        common.calibration_rows(str(path), tokenizer, 2, 8, seed=0)
    bad = tmp_path / "d.csv"
    bad.write_text("a,b\n")
    with pytest.raises(common.UserError, match="local files must be"):
        common.calibration_rows(str(bad), tokenizer, 2, 8, seed=0)


def test_offline_hub_dataset_names_the_constant(tokenizer):
    t0 = time.time()
    with pytest.raises(common.UserError, match="DATASET.*local"):
        common.calibration_rows("allenai/Dolci-Instruct-SFT", tokenizer, 2, 8, seed=0)
    assert time.time() - t0 < 60  # HF_DATASETS_OFFLINE=1: no 30 s network time-outs


def test_evaluate_is_chunk_invariant_and_consistent():
    model = make_model(olmo3_config())
    other = make_model(olmo3_config(), seed=1)
    rows = torch.randint(2, 320, (3, 17), generator=torch.Generator().manual_seed(0))
    a = common.evaluate(other, rows, 2, teacher=model, chunk_tokens=5)
    b = common.evaluate(other, rows, 3, teacher=model, chunk_tokens=10_000)
    for k in ("student_ppl", "teacher_ppl", "kl"):
        assert a[k] == pytest.approx(b[k], rel=1e-5)
    assert a["kl"] > 0.01 and a["tokens"] == 3 * 16
    cached = common.final_hiddens(model, rows, 2)  # the teacher run once, reused
    assert common.evaluate(other, rows, 2, teacher=model, chunk_tokens=5,
                           teacher_hidden=cached) == a
    self_kl = common.evaluate(model, rows, 3, teacher=model)
    assert abs(self_kl["kl"]) < 1e-6
    total, count = common.lm_loss(model, rows, chunk_tokens=7)
    assert self_kl["student_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert self_kl["teacher_ppl"] == pytest.approx(self_kl["student_ppl"], rel=1e-6)


def test_write_checkpoint_is_atomic_and_complete(olmo_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = make_model(olmo3_config())
    out = tmp_path / "ckpt"
    common.write_checkpoint(model, olmo_dir, str(out), {"stage": "test", "n": 1})
    record = common.read_record(str(out))
    assert record.pop("files") == sorted(p.name for p in out.iterdir())  # what Pare wrote there
    assert record == {"stage": "test", "n": 1}
    assert AutoTokenizer.from_pretrained(out).chat_template
    again = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)
    # a failure while writing leaves the previous checkpoint as it was, and no temporary
    with pytest.raises(common.UserError):
        common.write_checkpoint(model, str(tmp_path / "no-such-source"), str(out), {"stage": "x"})
    assert {k: v for k, v in common.read_record(str(out)).items() if k != "files"} == {
        "stage": "test", "n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_knob_budget():
    """The per-run surface stays small: at most 8 / 16 / 18 / 6 knobs (the rest are recipe
    constants, `_NAME`, edited in the script)."""
    import distill
    import evaluate
    import importance_analysis
    import prune
    for module, most in ((importance_analysis, 8), (prune, 16), (distill, 18), (evaluate, 6)):
        names = common.knobs(vars(module))
        assert 0 < len(names) <= most, (module.__name__, list(names))
        assert common.recipe(vars(module)), module.__name__  # recorded with every artefact


def test_a_hub_models_fingerprint_is_its_revision(tmp_path, monkeypatch):
    """A hub model first seen by distill.py has only config.json cached when its fingerprint is
    taken; downloading its weights later must not make it "another teacher"."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    before = common.fingerprint("org/tiny")
    (snap / "model.safetensors").write_bytes(b"\0" * 64)
    assert common.fingerprint("org/tiny") == before == "hub:org/tiny@abc123"
    assert common.fingerprint("org/other") == "hub:org/other"


def test_a_checkpoint_of_a_hub_model_recorded_by_content_is_refused():
    """Files of earlier commits are refused, not matched through a compatibility shim: a
    checkpoint that recorded its hub teacher by content hash no longer resumes."""
    import checkpoints
    progress = {"settings": {}, "student": "sha256:1", "teacher": "sha256:0", "fsdp": False,
                "world": 1}
    ids = {"student": "sha256:1", "teacher": "hub:org/tiny@abc123"}
    with pytest.raises(common.UserError, match="belongs to another teacher"):
        checkpoints.check_resumable(progress, Path("out-checkpoints/step-0000001"), {}, set(),
                                    ids, False, 1)
