"""prune.py: exactness where the maths says exact, the written checkpoint, budget search, bad input."""

import json
import subprocess

import pytest
import torch

import common
import importance_analysis as ia
import prune
from conftest import (ROOT, llama_config, make_model, olmo3_config, recipe, save_model,
                      script_cmd, split_args)

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
        "attention_factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}


def fake_scores(config, seed=0):
    """Random positive scores of the right shapes (tests set the entries that matter)."""
    g = torch.Generator().manual_seed(seed)
    n, f, h = config.num_hidden_layers, config.intermediate_size, config.num_attention_heads
    return {"mlp": torch.rand(n, f, generator=g) + 1, "attention": torch.rand(n, h, generator=g) + 1,
            "attn_ln": torch.rand(config.hidden_size, generator=g) + 1,
            "ffn_ln": torch.rand(config.hidden_size, generator=g) + 1,
            "layer": {i: 0.5 + i / 10 for i in range(n)}, "layer_loss": {}}


def prune_in_memory(model, scores, grouping="similarity", norm_correction=True,
                    head_score="activation", **target):
    """What main() does between loading and writing, on a live model: shape -> plan -> slice ->
    fresh model loaded strictly."""
    config = model.config
    src = common.shape_of(config)
    shape = {**src, **target}
    if "num_key_value_heads" not in target and src["num_key_value_heads"] == src["num_attention_heads"]:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    types_ = common.layer_types(config)
    protected = prune.protected_layers(types_, True)
    prune.validate_shape(shape, src, config.model_type, src["num_hidden_layers"] - len(protected))
    layers = prune.choose_layers(scores, "bi", src["num_hidden_layers"], shape["num_hidden_layers"],
                                 protected)
    return prune.prune_one(model, scores, shape, layers, torch.float32,
                           prune.Cut(grouping, head_score, norm_correction))


def ids(n=2, t=20, seed=3):
    return torch.randint(2, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


MAKERS = pytest.mark.parametrize("make_config", [olmo3_config, llama_config],
                                 ids=["olmo3", "llama-gqa"])


# ---- exactness --------------------------------------------------------------------------------

@MAKERS
def test_dropping_silent_neurons_is_exact(make_config):
    model = make_model(make_config())
    scores = fake_scores(model.config)
    dead = {i: torch.randperm(96, generator=torch.Generator().manual_seed(i))[:32]
            for i in range(model.config.num_hidden_layers)}
    with torch.no_grad():
        for i, cols in dead.items():
            model.model.layers[i].mlp.down_proj.weight[:, cols] = 0
            scores["mlp"][i, cols] = 0.01
    new, plan = prune_in_memory(model, scores, intermediate_size=64)
    assert all(set(f).isdisjoint(dead[i].tolist()) for i, f in enumerate(plan["ffn"]))
    torch.testing.assert_close(logits(new, ids()), logits(model, ids()), rtol=1e-5, atol=1e-5)


@MAKERS
def test_dropping_dead_layer_is_exact_and_generate_matches(make_config):
    model = make_model(make_config())
    scores = fake_scores(model.config)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    scores["layer"][1] = 0.0
    n = model.config.num_hidden_layers
    new, plan = prune_in_memory(model, scores, num_hidden_layers=n - 1)
    assert plan["layers"] == [i for i in range(n) if i != 1]
    assert [a.self_attn.layer_idx for a in new.model.layers] == list(range(n - 1))
    torch.testing.assert_close(logits(new, ids()), logits(model, ids()), rtol=1e-5, atol=1e-5)
    prompt = ids(1, 6)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(new.generate(prompt, **kw), model.generate(prompt, **kw))
    if make_config is olmo3_config:
        assert new.config.layer_types == ["sliding_attention"] * 2 + ["full_attention"]


@MAKERS
def test_dropping_zero_hidden_channels_is_exact_with_norm_correction(make_config):
    # the sqrt(H/H') gain correction is exact for eps -> 0; a random model's sub-layer outputs
    # are so small (~1e-3) that the default eps of 1e-6 would dominate Olmo's post-norms
    model = make_model(make_config(rms_norm_eps=1e-12))
    scores = fake_scores(model.config)
    dead = torch.arange(0, 64, 4)  # 16 of 64 channels carry nothing anywhere
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for block in model.model.layers:
            block.self_attn.o_proj.weight[dead] = 0
            block.mlp.down_proj.weight[dead] = 0
    scores["attn_ln"][dead] = scores["ffn_ln"][dead] = 0
    want = logits(model, ids())
    new, plan = prune_in_memory(model, scores, hidden_size=48)
    assert set(plan["hidden"]).isdisjoint(dead.tolist())
    torch.testing.assert_close(logits(new, ids()), want, rtol=1e-4, atol=1e-4)
    raw, _ = prune_in_memory(model, scores, norm_correction=False, hidden_size=48)
    assert (logits(raw, ids()) - want).abs().max() > 1e-2  # the correction is what makes it exact


@MAKERS
def test_head_score_output_drops_heads_o_proj_silences(make_config):
    """Heads whose o_proj columns are zero contribute nothing: ranked by 'output' they go first,
    although their activation scores are the highest; dropping them is exact on Llama (Olmo 3's
    q/k norms span all heads, so removing any head moves the others a little)."""
    model = make_model(make_config())
    src = common.shape_of(model.config)
    per = src["num_attention_heads"] // src["num_key_value_heads"]
    silent = [0] if per == 1 else [g * per for g in range(src["num_key_value_heads"])]
    hd = src["head_dim"]
    with torch.no_grad():
        for layer in model.model.layers:
            for h in silent:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    scores = fake_scores(model.config)
    scores["attention"][:, silent] = 10.0  # the activation score says: keep these
    target = {"num_attention_heads": src["num_attention_heads"] - len(silent)}
    if per == 1:
        target["num_key_value_heads"] = target["num_attention_heads"]
    x = ids()
    out, plan = prune_in_memory(model, scores, head_score="output", **target)
    assert all(not set(silent) & set(heads) for heads in plan["heads"])
    err_output = (logits(out, x) - logits(model, x)).abs().max()
    if model.config.model_type == "llama":
        assert err_output < 1e-5
    act, plan = prune_in_memory(model, scores, head_score="activation", **target)
    assert all(set(silent) <= set(heads) for heads in plan["heads"])
    assert (logits(act, x) - logits(model, x)).abs().max() > 5 * err_output  # olmo3: 0.93 vs 0.086


def test_mha_to_gqa_with_identical_kv_in_groups_is_exact():
    model = make_model(olmo3_config())
    hd = 16
    with torch.no_grad():  # kv heads 0 and 2 identical, 1 and 3 identical (not neighbours)
        for block in model.model.layers:
            a = block.self_attn
            for w in (a.k_proj.weight, a.v_proj.weight, a.k_norm.weight):
                w[2 * hd:3 * hd] = w[0:hd]
                w[3 * hd:4 * hd] = w[hd:2 * hd]
    scores = fake_scores(model.config)
    want = logits(model, ids())
    new, plan = prune_in_memory(model, scores, num_key_value_heads=2)
    assert all(sorted(map(sorted, g)) == [[0, 2], [1, 3]] for g in plan["kv_groups"])
    assert new.config.num_key_value_heads == 2 and new.config.num_attention_heads == 4
    torch.testing.assert_close(logits(new, ids()), want, rtol=1e-4, atol=1e-4)
    naive, _ = prune_in_memory(model, scores, grouping="index", num_key_value_heads=2)
    assert (logits(naive, ids()) - want).abs().max() > 1e-2  # grouping by index pools unlike heads


def test_gqa_to_fewer_kv_heads_exact_and_heads_per_group():
    model = make_model(llama_config())  # 4 heads, 2 kv heads
    with torch.no_grad():
        for block in model.model.layers:
            a = block.self_attn
            a.k_proj.weight[16:32] = a.k_proj.weight[0:16]
            a.v_proj.weight[16:32] = a.v_proj.weight[0:16]
    scores = fake_scores(model.config)
    new, _ = prune_in_memory(model, scores, num_key_value_heads=1)
    torch.testing.assert_close(logits(new, ids()), logits(model, ids()), rtol=1e-4, atol=1e-4)
    # two heads of four: one per kv group, the better one within each group; heads whose o_proj
    # columns are zero contribute nothing, so dropping them is exact on Llama (no q/k norm)
    scores["attention"][:] = torch.tensor([1.0, 3.0, 2.0, 0.5])  # group 0: {0, 1}, group 1: {2, 3}
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight[:, 0:16] = 0
            block.self_attn.o_proj.weight[:, 48:64] = 0
    new, plan = prune_in_memory(model, scores, num_attention_heads=2)
    assert plan["heads"] == [[1, 2]] * 3 and plan["kv_groups"][0] == [[1], [2]]
    torch.testing.assert_close(logits(new, ids()), logits(model, ids()), rtol=1e-5, atol=1e-5)


def test_param_count_formula_matches_models():
    for config in (olmo3_config(), llama_config(), olmo3_config(num_key_value_heads=2)):
        src = common.shape_of(config)
        model = make_model(config)
        assert common.param_count(src, config)["total"] == sum(p.numel() for p in model.parameters())


def test_choose_layers_metrics_and_protection():
    scores = {"layer": {0: 0.3, 1: 0.1, 2: 0.2, 3: 0.05, 4: 0.4},
              "layer_loss": {0: 0.1, 1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2}}
    assert prune.choose_layers(scores, "bi", 5, 3, set()) == [0, 2, 4]
    assert prune.choose_layers(scores, "bi", 5, 3, {3}) == [0, 3, 4]
    assert prune.choose_layers(scores, "loss", 5, 3, set()) == [1, 2, 3]
    runs = prune.contiguous_runs([0, 1, 2, 4], 2)  # layer 3 protected: runs skip over it
    assert runs == [[0, 1], [1, 2], [2, 4]]
    costs = {tuple(r): c for r, c in zip(runs, (3.0, 2.0, 2.5))}
    assert prune.choose_layers(scores, "block", 5, 3, {3}, costs) == [0, 3, 4]
    assert prune.protected_layers(["sliding_attention", "full_attention"], True) == {1}
    assert prune.protected_layers(["full_attention"] * 3, True) == set()  # all full: nothing special


# ---- the written checkpoint -----------------------------------------------------------------

@pytest.fixture(scope="module")
def yarn_olmo(tmp_path_factory, text_file):
    """A tiny Olmo 3 with YaRN on its full-attention layer, its scores file and a data file."""
    root = tmp_path_factory.mktemp("yarn")
    model = make_model(olmo3_config(num_hidden_layers=8, layer_types=(
        ["sliding_attention"] * 3 + ["full_attention"]) * 2, rope_scaling=YARN, rope_theta=500000.0))
    model_dir = save_model(model, root / "model")
    scores = root / "scores.pt"
    ia.main([f"MODEL={model_dir}", f"DATASET={text_file}", "NUM_SAMPLES=4", "SEQ_LEN=32",
             "LOSS_SAMPLES=2", f"OUTPUT={scores}"])
    return model_dir, str(scores), text_file


def run_main(model_dir, scores, data, out, *args):
    """prune.main in-process; `_NAME=value` arguments set recipe constants for the run."""
    knobs, private = split_args(args)
    with recipe(prune, **private):
        return prune.main([f"MODEL={model_dir}", f"SCORES={scores}", f"DATASET={data}",
                           "NUM_SAMPLES=3", "SEQ_LEN=32", f"OUTPUT={out}", *knobs])


def test_checkpoint_reloads_with_config_record_and_generate(yarn_olmo, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, scores, data = yarn_olmo
    out = tmp_path / "pruned"
    run_main(model_dir, scores, data, out, "TARGET_HIDDEN=48", "TARGET_FFN=64", "TARGET_HEADS=2",
             "TARGET_KV_HEADS=1", "TARGET_LAYERS=5", "_DEPTH_METRIC=block")
    printed = capsys.readouterr().out
    for key in ("shape:", "params:", "params_non_embedding:", "vllm_legacy_servable: no",
                "teacher_ppl:", "pruned_ppl:", "kl:", f"output: {out}"):
        assert key in printed
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.num_hidden_layers, c.head_dim) == (48, 64, 2, 1, 5, 16)
    assert c.layer_types.count("full_attention") == 2 and len(c.layer_types) == 5  # protected
    assert c.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert c.rope_parameters["full_attention"]["factor"] == 8.0
    assert c.rope_parameters["sliding_attention"]["rope_type"] == "default"
    raw = json.loads((out / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"]["rope_type"] == "yarn"  # 4.57
    assert raw["head_dim"] == 16
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and (out / "generation_config.json").is_file()
    record = common.read_record(out)
    assert record["stage"] == "prune" and record["source_model"] == model_dir
    assert record["scores"] == scores and record["config"]["TARGET_LAYERS"] == 5
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        assert key in record["shape"] and key in record["source_shape"]
    kept = record["kept"]
    assert len(kept["layers"]) == 5 and {3, 7} <= set(kept["layers"])
    assert len(kept["hidden"]) == 48 and len(kept["ffn"]) == len(kept["heads"]) == 5
    assert all(len(f) == 64 for f in kept["ffn"]) and all(len(h) == 2 for h in kept["heads"])
    assert record["params"]["after"] == sum(p.numel() for p in model.parameters())
    assert record["params"]["before"] > record["params"]["after"]
    assert {"student_ppl", "teacher_ppl", "kl"} <= set(record["metrics"])
    assert record["versions"]["transformers"]
    x = ids(1, 5)
    out_ids = model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=1)
    with torch.no_grad():  # cached decoding agrees with a full forward of the same tokens
        full = model(out_ids[:, :-1]).logits[0, -1].argmax()
    assert out_ids.shape[1] == 15 and full == out_ids[0, -1]
    assert not list(tmp_path.glob(".pruned*"))


def test_llama_tied_embeddings_stay_tied(llama_dir, text_file, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    scores = tmp_path / "scores.pt"
    ia.main([f"MODEL={llama_dir}", f"DATASET={text_file}", "NUM_SAMPLES=2", "SEQ_LEN=32",
             "LOSS_SAMPLES=0", f"OUTPUT={scores}"])
    out = tmp_path / "pruned"
    run_main(llama_dir, scores, text_file, out, "TARGET_HIDDEN=48", "TARGET_HEADS=2")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 2


def test_search_grids_scale_with_the_model():
    """The grids are derived from each model's sizes: SmolLM2-135M (576 hidden, 9 heads, which
    Llama's config needs the hidden size to divide by) and Olmo-3-7B both get several candidates
    inside a 5% budget window, where fixed 7B-sized steps found none on SmolLM2."""
    from transformers import LlamaConfig, Olmo3Config
    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, tie_word_embeddings=True)
    olmo = Olmo3Config(vocab_size=100278, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    assert prune.grid_steps(common.shape_of(olmo), "olmo3", 16) == (256, 688, 2)
    for config, budget in ((smol, 100e6), (olmo, 5e9)):
        src = common.shape_of(config)
        steps = prune.grid_steps(src, config.model_type, 16)
        shapes = prune.grid_shapes(src, config, src["num_hidden_layers"], False, False, steps, 0.5)
        window = [s for s in shapes if 0.95 * budget <= s["params"] <= budget]
        assert len(window) >= 3, (config.model_type, steps)
        if config.model_type == "llama":
            assert all(s["hidden_size"] % s["num_attention_heads"] == 0 for s in shapes)


def test_budget_search_ranks_and_writes_top(yarn_olmo, tmp_path, capsys):
    model_dir, scores, data = yarn_olmo
    out = tmp_path / "pruned"
    config = common.load_config(model_dir)
    budget = 0.8 * common.param_count(common.shape_of(config), config)["total"]
    result = run_main(model_dir, scores, data, out, f"TARGET_PARAMS={budget}", "_BUDGET_TOLERANCE=0.1",
                      "_SEARCH_DEPTH=True", "_NUM_CANDIDATES=3", "SAVE_TOP=2")
    printed = capsys.readouterr().out
    assert "rank" in printed and "budget:" in printed
    kls = [r["metrics"]["kl"] for r in result["results"]]
    assert len(kls) == 3 and kls == sorted(kls)
    for path, res in zip((out, tmp_path / "pruned-2"), result["results"]):
        record = common.read_record(path)
        assert 0.9 * budget <= record["params"]["after"] <= budget
        assert record["shape"] == res["shape"] and len(record["search"]) == 3
    assert common.read_record(out)["rank"] == 1


def test_end_to_end_subprocess(yarn_olmo, tmp_path):
    model_dir, scores, data = yarn_olmo
    common_args = [f"MODEL={model_dir}", f"SCORES={scores}", f"DATASET={data}", "NUM_SAMPLES=2",
                   "SEQ_LEN=32"]
    shape = subprocess.run(script_cmd("prune.py", *common_args, "TARGET_FFN=64", "TARGET_HIDDEN=32",
                                      f"OUTPUT={tmp_path / 'shape'}"),
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert shape.returncode == 0, shape.stderr
    assert f"output: {tmp_path / 'shape'}" in shape.stdout
    assert common.read_record(tmp_path / "shape")["shape"]["hidden_size"] == 32
    config = common.load_config(model_dir)
    budget = int(0.7 * common.param_count(common.shape_of(config), config)["total"])
    search = subprocess.run(script_cmd("prune.py", *common_args, f"TARGET_PARAMS={budget}",
                                       "_BUDGET_TOLERANCE=0.15",
                                       "_NUM_CANDIDATES=2", f"OUTPUT={tmp_path / 'budget'}"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stderr
    assert "rank" in search.stdout
    assert common.read_record(tmp_path / "budget")["params"]["after"] <= budget


# ---- bad input: one clear error, nothing written --------------------------------------------

def test_bad_inputs(yarn_olmo, llama_dir, tmp_path):
    model_dir, scores, data = yarn_olmo
    out = tmp_path / "out"

    def bad(*args, model=model_dir, scores_=scores):
        with pytest.raises(common.UserError) as e:
            run_main(model, scores_, data, out, *args)
        assert not out.exists() and not list(tmp_path.glob(".out*"))
        return str(e.value)

    assert "bigger than the source" in bad("TARGET_FFN=200")
    assert "bigger than the source" in bad("TARGET_KV_HEADS=6")
    assert "positive integer" in bad("TARGET_HIDDEN=0")
    assert "not divisible by the kv heads" in bad("TARGET_HEADS=3", "TARGET_KV_HEADS=2")
    assert "only 6 may be dropped" in bad("TARGET_LAYERS=1")  # 2 full-attention layers protected
    assert "DEPTH_METRIC" in bad("TARGET_LAYERS=6", "_DEPTH_METRIC='random'")
    assert "GQA_GROUPING" in bad("_GQA_GROUPING='hash'")
    assert "HEAD_SCORE" in bad("_HEAD_SCORE='norm'")
    assert "both set" in bad("TARGET_PARAMS=1e5", "TARGET_FFN=64")
    assert "bigger than the source" in bad("TARGET_PARAMS=1e12")
    assert "no candidate shape" in bad("TARGET_PARAMS=1e3")
    assert "SAVE_TOP" in bad("SAVE_TOP=2")
    assert "valid names" in bad("TARGET_FNN=64")
    assert "no such file" in bad(scores_=str(tmp_path / "missing.pt"))
    not_scores = tmp_path / "junk.pt"
    not_scores.write_text("hello")
    assert "not a scores file" in bad(scores_=str(not_scores))
    # scores from another model: recorded id differs / shapes differ
    other = save_model(make_model(olmo3_config(num_hidden_layers=8, layer_types=(
        ["sliding_attention"] * 3 + ["full_attention"]) * 2, rope_scaling=YARN,
        rope_theta=500000.0), seed=1), tmp_path / "other")
    assert "was made from MODEL" in bad(model=other)
    s = torch.load(scores, weights_only=True)
    s["meta"]["model"] = llama_dir
    mislabelled = tmp_path / "mislabelled.pt"
    torch.save(s, mislabelled)
    assert "does not match MODEL" in bad(model=llama_dir, scores_=str(mislabelled))
    s = torch.load(scores, weights_only=True)
    s["layer_loss"] = {}
    no_loss = tmp_path / "noloss.pt"
    torch.save(s, no_loss)
    assert "needs per-layer losses" in bad("_DEPTH_METRIC='loss'", scores_=str(no_loss))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(common.UserError, match="not writable"):
        run_main(model_dir, scores, data, a_file / "pruned")


def test_bad_llama_inputs(llama_dir, text_file, tmp_path):
    scores = tmp_path / "scores.pt"
    ia.main([f"MODEL={llama_dir}", f"DATASET={text_file}", "NUM_SAMPLES=2", "SEQ_LEN=32",
             "LOSS_SAMPLES=0", f"OUTPUT={scores}"])
    out = tmp_path / "out"
    for args, msg in ((["TARGET_HIDDEN=50"], "not a multiple of the 4 attention heads"),
                      (["TARGET_HEADS=3"], "not divisible by the kv heads"),
                      (["TARGET_LAYERS=0"], "positive integer")):
        with pytest.raises(common.UserError, match=msg):
            run_main(llama_dir, scores, text_file, out, *args)
        assert not out.exists()
