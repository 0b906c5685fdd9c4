"""importance_analysis.py: scores against a brute-force computation, invariances, end to end."""

import math
import shutil
import subprocess
import sys

import pytest
import torch

import common
import importance_analysis as ia
from conftest import ROOT, llama_config, make_model, olmo3_config


def rows_of(model, n=6, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (n, t), generator=g)


@torch.no_grad()
def brute_force(model, family, rows):
    """Capture every activation on all rows at once and apply the formulas in float64."""
    captured = {}
    hooks = []
    for i, block in enumerate(model.model.layers):
        def keep(key, i=i, pre=True):
            def hook(mod, args, out=None):
                captured[key, i] = (args[0] if pre else out).double()
            return hook
        hooks += [block.mlp.down_proj.register_forward_pre_hook(keep("mlp")),
                  block.self_attn.o_proj.register_forward_pre_hook(keep("attention")),
                  getattr(block, family.attn_norm).register_forward_hook(keep("attn_ln", pre=False)),
                  getattr(block, family.mlp_norm).register_forward_hook(keep("ffn_ln", pre=False))]
    hidden = model.model(input_ids=rows, output_hidden_states=True, use_cache=False).hidden_states
    for h in hooks:
        h.remove()
    n = model.config.num_hidden_layers

    def agg(x):  # mean |x| over the sequence, then L2 over rows -> per channel
        return x.abs().mean(1).pow(2).sum(0).sqrt()

    hd = common.head_dim(model.config)
    out = {"mlp": torch.stack([agg(captured["mlp", i]) for i in range(n)]),
           "attention": torch.stack([agg(captured["attention", i]).view(-1, hd).norm(dim=-1)
                                     for i in range(n)]),
           "attn_ln": sum(agg(captured["attn_ln", i]) for i in range(n)),
           "ffn_ln": sum(agg(captured["ffn_ln", i]) for i in range(n))}
    # hidden_states[i] is block i's input; the last entry is after the final norm, so block
    # n-1's raw output is not in the tuple: compute it from the captured layer output instead.
    outs = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, o: outs.setdefault("last", (o[0] if isinstance(o, tuple) else o).double()))
    model.model(input_ids=rows, use_cache=False)
    hook.remove()
    block_out = list(hidden[1:n]) + [outs["last"]]
    out["layer"] = [(1 - torch.nn.functional.cosine_similarity(
        hidden[i].double(), block_out[i].double(), dim=-1)).mean().item() for i in range(n)]
    return out


@pytest.mark.parametrize("make_config", [olmo3_config, llama_config], ids=["olmo3", "llama-gqa"])
def test_scores_match_brute_force(make_config):
    model = make_model(make_config())
    family = common.family_of(model.config)
    rows = rows_of(model)
    got = ia.collect_scores(model, family, rows, batch_size=4, progress=False)
    want = brute_force(model, family, rows)
    for key in ("mlp", "attention", "attn_ln", "ffn_ln"):
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-5)
    assert got["mlp"].shape == (model.config.num_hidden_layers, model.config.intermediate_size)
    assert got["attention"].shape == (model.config.num_hidden_layers,
                                      model.config.num_attention_heads)
    for i, bi in enumerate(want["layer"]):
        assert math.isclose(got["layer"][i], bi, rel_tol=1e-5, abs_tol=1e-6)


def test_bfloat16_path_accumulates_in_float32():
    """GPU users run bf16: statistics must equal float64 maths on the same bf16 activations."""
    model = make_model(olmo3_config()).to(torch.bfloat16)
    family = common.family_of(model.config)
    rows = rows_of(model, n=3, t=16)
    mask = torch.ones_like(rows)
    mask[1, 11:] = 0  # exercise the masked bf16 reduction too (rows are scored as given)
    got = ia.collect_scores(model, family, rows, batch_size=3, mask=mask, progress=False)
    assert got["mlp"].dtype == torch.float32
    masked = ia.collect_scores(model, family, rows[1:2, :11], batch_size=1, progress=False)
    unmasked = ia.collect_scores(model, family, rows[[0, 2]], batch_size=2, progress=False)
    for key in ("mlp", "attention"):  # squared scores add over rows; bf16 kernels differ by shape
        torch.testing.assert_close(got[key].square(),
                                   masked[key].square() + unmasked[key].square(),
                                   rtol=3e-2, atol=1e-3)
    want = brute_force(model, family, rows[[0, 2]])
    for key in ("mlp", "attention", "attn_ln", "ffn_ln"):
        torch.testing.assert_close(unmasked[key].double(), want[key], rtol=1e-4, atol=1e-5)
    for i, bi in enumerate(want["layer"]):
        assert math.isclose(unmasked["layer"][i], bi, rel_tol=1e-3, abs_tol=1e-5)


@pytest.mark.parametrize("make_config", [olmo3_config, llama_config], ids=["olmo3", "llama-gqa"])
def test_zeroed_layer_and_neurons(make_config):
    model = make_model(make_config())
    family = common.family_of(model.config)
    rows = rows_of(model)
    before = ia.collect_scores(model, family, rows, batch_size=3, progress=False)
    dead_layer, layer, col, row = 1, 2, 5, 7
    with torch.no_grad():
        model.model.layers[dead_layer].self_attn.o_proj.weight.zero_()
        model.model.layers[dead_layer].mlp.down_proj.weight.zero_()
        mlp = model.model.layers[layer].mlp
        mlp.down_proj.weight[:, col] = 0  # neuron `col` still fires, it just writes nothing
        mlp.gate_proj.weight[row] = 0     # neuron `row` never fires
        mlp.up_proj.weight[row] = 0
    after = ia.collect_scores(model, family, rows, batch_size=3, progress=False)
    assert after["layer"][dead_layer] < 1e-6
    assert min(after["layer"], key=after["layer"].get) == dead_layer
    assert after["mlp"][layer, row] == 0
    # the silent neuron's activation is unchanged only if nothing upstream changed: compare
    # against the same model with just that column zeroed
    assert after["mlp"][layer, col] > 0.1 * after["mlp"][layer].mean()
    base, loss = ia.layer_skip_losses(model, rows[:2], batch_size=2, progress=False)
    assert abs(loss[dead_layer]) < 1e-5
    assert all(abs(loss[i]) > 1e-4 for i in loss if i != dead_layer)
    assert before["layer"][dead_layer] > 1e-3


def test_silent_neuron_score_unchanged():
    model = make_model(olmo3_config())
    family = common.family_of(model.config)
    rows = rows_of(model)
    layer, col = 3, 11  # last layer: nothing downstream of down_proj feeds another score there
    before = ia.collect_scores(model, family, rows, batch_size=6, progress=False)
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[:, col] = 0
    after = ia.collect_scores(model, family, rows, batch_size=6, progress=False)
    torch.testing.assert_close(after["mlp"][layer], before["mlp"][layer])
    assert after["mlp"][layer, col] > 0


def test_batch_split_and_padding_do_not_change_scores():
    model = make_model(olmo3_config())
    family = common.family_of(model.config)
    rows = rows_of(model, n=6, t=20)
    ref = ia.collect_scores(model, family, rows, batch_size=6, progress=False)
    for bs in (1, 4):
        got = ia.collect_scores(model, family, rows, batch_size=bs, progress=False)
        for key in ("mlp", "attention", "attn_ln", "ffn_ln"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
        assert got["layer"] == pytest.approx(ref["layer"], rel=1e-5)
    # a short row padded to the batch's length scores as if it stood alone, unpadded
    short = rows_of(model, n=1, t=13, seed=2)
    padded = torch.cat([rows, torch.cat([short, torch.ones(1, 7, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[-1, 13:] = 0
    got = ia.collect_scores(model, family, padded, batch_size=4, mask=mask, progress=False)
    alone = ia.collect_scores(model, family, short, batch_size=1, progress=False)
    for key in ("mlp", "attention"):  # squared scores add over rows
        torch.testing.assert_close(got[key].square(), ref[key].square() + alone[key].square(),
                                   rtol=1e-5, atol=1e-6)
    for i in got["layer"]:  # BI is a mean over real tokens
        want = (ref["layer"][i] * rows.numel() + alone["layer"][i] * 13) / (rows.numel() + 13)
        assert got["layer"][i] == pytest.approx(want, rel=1e-5)
    assert got["tokens"] == rows.numel() + 13


def test_main_in_process_writes_documented_file(olmo_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sub" / "scores.pt"
    ia.main([f"MODEL={olmo_dir}", f"DATASET={text_file}", "NUM_SAMPLES=4", "SEQ_LEN=32",
             "BATCH_SIZE=3", "LOSS_SAMPLES=2", f"OUTPUT={out}"])
    scores = torch.load(out, weights_only=True)
    assert scores["mlp"].shape == (4, 96) and scores["attention"].shape == (4, 4)
    assert scores["attn_ln"].shape == (64,) and scores["ffn_ln"].shape == (64,)
    assert sorted(scores["layer"]) == sorted(scores["layer_loss"]) == [0, 1, 2, 3]
    meta = scores["meta"]
    assert meta["num_samples"] == 4 and meta["num_tokens"] == 4 * 32 and meta["loss_samples"] == 2
    assert meta["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert meta["config"]["SEQ_LEN"] == 32 and meta["model"] == olmo_dir
    printed = capsys.readouterr().out
    assert "BI: most important layers" in printed and "sliding" in printed
    assert f"output: {out}" in printed
    assert not list(out.parent.glob("*.tmp"))


def test_end_to_end_subprocess(llama_dir, text_file, tmp_path):
    out = tmp_path / "scores.pt"
    uv = shutil.which("uv")
    cmd = ([uv, "run", "importance_analysis.py"] if uv else [sys.executable, "importance_analysis.py"])
    proc = subprocess.run(cmd + [f"MODEL={llama_dir}", f"DATASET={text_file}", "NUM_SAMPLES=4",
                                 "SEQ_LEN=32", "BATCH_SIZE=2", "LOSS_SAMPLES=1", f"OUTPUT={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    scores = torch.load(out, weights_only=True)
    assert set(scores) >= {"mlp", "attention", "attn_ln", "ffn_ln", "layer", "layer_loss", "meta"}
    assert scores["mlp"].shape == (3, 96) and scores["attention"].shape == (3, 4)
    assert scores["meta"]["architecture"] == ["LlamaForCausalLM"]

    bad = subprocess.run(cmd + ["NUM_SAMPLE=4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown constant 'NUM_SAMPLE'")


# ---- bad input: one clear error, nothing written ------------------------------------------

def bad_run(tmp_path, *args):
    out = tmp_path / "scores.pt"
    with pytest.raises(common.UserError) as e:
        ia.main([*args] + ([f"OUTPUT={out}"] if not any(a.startswith("OUTPUT=") for a in args)
                           else []))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    return str(e.value)


def test_bad_inputs(olmo_dir, text_file, tmp_path):
    ok = [f"MODEL={olmo_dir}", f"DATASET={text_file}", "SEQ_LEN=32", "NUM_SAMPLES=2"]
    assert "valid names" in bad_run(tmp_path, "NOPE=1")
    assert "NUM_SAMPLES" in bad_run(tmp_path, *ok, "NUM_SAMPLES='many'")
    assert "SEQ_LEN" in bad_run(tmp_path, *ok, "SEQ_LEN=1.5")
    assert "no such file" in bad_run(tmp_path, *ok, f"DATASET={tmp_path / 'missing.txt'}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "fewer than one row" in bad_run(tmp_path, *ok, f"DATASET={empty}")
    assert "max_position_embeddings" in bad_run(tmp_path, *ok, "SEQ_LEN=100000")  # before tokenizing
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "not writable" in bad_run(tmp_path, *ok, f"OUTPUT={a_file / 'scores.pt'}")
    from transformers import GPT2Config
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)  # config only: no weights
    assert "unsupported architecture 'gpt2'" in bad_run(tmp_path, f"MODEL={gpt2}",
                                                        f"DATASET={text_file}")
    assert "MODEL" in bad_run(tmp_path, f"MODEL={tmp_path / 'nowhere'}")


def test_override_parsing():
    ns = {"A": 1, "B": 0.5, "C": "x", "D": None, "E": True, "F": [1, 2], "lower": 3,
          "G": None, "H": None, "TABLE": (1, 2), "_RECIPE": 4,
          "__annotations__": {"D": list | None, "G": float | None, "H": str | None}}
    cfg = common.configure(ns, ["A=3", "B=2", "C=123", "D=[1, 'a']", "E=False", "F=[4]", "G=3",
                                "H=cuda:0"])
    assert vars(cfg) == {"A": 3, "B": 2.0, "C": "123", "D": [1, "a"], "E": False, "F": [4],
                         "G": 3.0, "H": "cuda:0"}
    assert ns["A"] == 1  # the module's defaults are left alone
    assert common.recipe(ns) == {"_RECIPE": 4}
    for bad in ("A=1.5", "A=True", "E=1", "F=3", "B='x'", "lower=1", "A", "G='abc'", "D=5",
                "TABLE=(3,)"):
        with pytest.raises(common.UserError):
            common.configure(ns, [bad])
    with pytest.raises(common.UserError, match="recipe constant: edit _RECIPE"):
        common.configure(ns, ["RECIPE=5"])
    with pytest.raises(TypeError, match="needs an annotation"):  # a None knob must say its type
        common.configure({"X": None}, [])


@pytest.mark.parametrize("make_config", [olmo3_config, llama_config], ids=["olmo3", "llama-gqa"])
def test_skip_loss_reusing_the_prefix_equals_whole_forwards(make_config, monkeypatch, capsys):
    """Skipping layer i from the kept hidden state entering it gives the numbers of a whole
    forward with layer i replaced by the identity; so does the fallback when states do not fit."""
    model = make_model(make_config())
    rows = rows_of(model, n=5, t=24)
    base = common.skip_loss(model, rows, 2)
    want = {i: common.skip_loss(model, rows, 2, [i]) - base
            for i in range(model.config.num_hidden_layers)}
    got_base, got = ia.layer_skip_losses(model, rows, 2, progress=False)
    assert "keeping the hidden states entering each layer" in capsys.readouterr().out
    assert got_base == pytest.approx(base, rel=1e-6) and got.keys() == want.keys()
    assert all(got[i] == pytest.approx(want[i], abs=1e-5) for i in want)
    # the model is left as it was: no stub remains on any layer
    assert common.skip_loss(model, rows, 2) == pytest.approx(base, rel=1e-6)
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    saved = []
    monkeypatch.setattr(ia, "state_device", lambda model, rows: None)  # nowhere to keep them
    fb_base, fb = ia.layer_skip_losses(model, rows, 2, done={0: want[0]},
                                       save=lambda b, d: saved.append(dict(d)), progress=False)
    assert "fit nowhere" in capsys.readouterr().out
    assert fb_base == pytest.approx(base) and fb == pytest.approx(want)
    assert len(saved) == len(want) - 1 and 0 in saved[0]  # layer 0 was done: not measured again
