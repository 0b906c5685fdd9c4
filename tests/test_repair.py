"""The least-squares repair: identity when nothing is cut, exact on a planted dependency (by score
and by the surgeon's choice of neurons), never worse than slicing on the calibration rows, and
wired through importance -> prune."""

import pytest
import torch

import common
import importance_analysis as ia
import prune
from conftest import llama_config, make_model, olmo3_config, recipe, save_model
from test_prune import fake_scores, ids

def mha_llama():
    return llama_config(num_key_value_heads=4)


def wide_gqa_llama():
    return llama_config(num_attention_heads=8, num_key_value_heads=2)


MAKERS = pytest.mark.parametrize("make_config", [olmo3_config, llama_config],
                                 ids=["olmo3", "llama-gqa"])


def grams_of(model, rows):
    """The Grams importance_analysis collects, as prune reads them: grams(key, layer)."""
    got = ia.collect_scores(model, common.family_of(model.config), rows, 4, progress=False,
                            gram_rows=len(rows))
    return lambda key, layer: got["grams"][key][layer]


def cut(model, scores, grams, damping=1e-3, select=True, **target):
    src = common.shape_of(model.config)
    shape = {**src, **target}
    if src["num_key_value_heads"] == src["num_attention_heads"]:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    return prune.prune_one(model, scores, shape, list(range(src["num_hidden_layers"])),
                           torch.float32, prune.Cut(grams=grams, damping=damping, select=select))


@MAKERS
def test_nothing_cut_is_the_identity(make_config):
    model = make_model(make_config())
    new, plan = cut(model, fake_scores(model.config), grams_of(model, ids(8, 24, seed=1)))
    a, b = model.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plan["repair"] == {}


@MAKERS
@pytest.mark.parametrize("select", [False, True], ids=["by-score", "by-surgeon"])
def test_a_planted_dependent_neuron_is_dropped_exactly(make_config, select):
    """Neuron 5 of every layer fires exactly twice as much as neuron 3 (same gate, twice the up
    projection): dropping one of them and folding it into the other's column loses nothing. By
    score, 5 is dropped because it scores lowest; by the surgeon's choice, 3 or 5 is dropped
    although both score highest (the activation ranking would keep them)."""
    model = make_model(make_config())
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.gate_proj.weight[5] = block.mlp.gate_proj.weight[3]
            block.mlp.up_proj.weight[5] = 2 * block.mlp.up_proj.weight[3]
    scores = fake_scores(model.config)
    scores["mlp"][:, [3, 5]] = 0.0 if not select else scores["mlp"].max() + 1
    scores["mlp"][:, 3] = scores["mlp"].max() + 1  # 3 always looks important
    f = model.config.intermediate_size
    grams = grams_of(model, ids(8, 24, seed=1))
    repaired, plan = cut(model, scores, grams, damping=1e-10, select=select,
                         intermediate_size=f - 1)
    plain, _ = cut(model, scores, None, intermediate_size=f - 1)
    if select:
        assert all(len({3, 5} - set(kept)) == 1 for kept in plan["ffn"])
    else:
        assert all(5 not in kept for kept in plan["ffn"])
    x = ids(2, 20, seed=5)  # other tokens than the statistics saw: the dependency is exact
    with torch.no_grad():
        want, got, sliced = (m(input_ids=x).logits for m in (model, repaired, plain))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (sliced - want).abs().max() > 100 * (got - want).abs().max()
    assert plan["repair"]["mlp"][1] < 1e-8 < plan["repair"]["mlp"][0]


def test_the_surgeon_cuts_what_the_rest_can_replace():
    """Inputs {0, 1, 3} span only two dimensions, and so do {2, 4, 5}: cutting one of each
    loses nothing after the refit, cutting two of a triple does. The surgeon's choice cuts one of
    each (one input a round), although 0 and 1 have the smallest weights. (In one round of two
    it could cut 0 and 1 together: each alone is replaceable; that is why rounds are many.)
    Keeping everything keeps everything; a zero Gram gives a valid choice, a NaN one None."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64, generator=g)
    x[:, 1] = x[:, 0] - 2 * x[:, 3]
    x[:, 4] = 0.5 * x[:, 2] + x[:, 5]
    w = torch.randn(7, 6, dtype=torch.float64, generator=g)
    w[:, [2, 3, 4, 5]] *= 10  # by weight alone, 0 and 1 would go: not exact
    gram = x.T @ x
    kept = prune.surgeon_keep(w, gram, 4, 1e-12, 2)
    assert len(kept) == 4 and all(len(t - set(kept)) == 1 for t in ({0, 1, 3}, {2, 4, 5}))
    assert prune.refit(w, gram, kept, 1e-12)[2] < 1e-9
    assert min(prune.refit(w, gram, k, 1e-12)[2] for k in ([2, 3, 4, 5], [0, 1, 3, 5])) > 1e-3
    assert prune.surgeon_keep(w, gram, 6, 1e-3, 4) == list(range(6))
    kept = prune.surgeon_keep(w, torch.zeros(6, 6, dtype=torch.float64), 3, 1e-3, 2)
    assert len(kept) == 3 and len(set(kept)) == 3
    assert prune.surgeon_keep(w, torch.full((6, 6), float("nan")), 3, 1e-3, 2) is None


@MAKERS
def test_repair_is_never_worse_than_slicing_on_the_calibration_rows(make_config):
    model = make_model(make_config())
    rows = ids(8, 24, seed=1)
    scores = fake_scores(model.config)
    grams = grams_of(model, rows)
    target = dict(intermediate_size=48, num_attention_heads=2)
    repaired, plan = cut(model, scores, grams, **target)
    plain, _ = cut(model, scores, None, **target)
    for key in ("mlp", "attention"):
        before, after = plan["repair"][key]
        assert 0 <= after <= before
    kl = {name: common.evaluate(m, rows, 4, teacher=model)["kl"]
          for name, m in (("repaired", repaired), ("plain", plain))}
    assert kl["repaired"] <= kl["plain"]


def test_refit_of_a_singular_gram_is_finite():
    w = torch.randn(6, 5, dtype=torch.float64)
    x = torch.randn(40, 5, dtype=torch.float64)
    x[:, 2] = 0  # a neuron that never fires: a zero row and column in the Gram
    x[:, 4] = x[:, 1]  # and two identical ones
    a, before, after = prune.refit(w, x.T @ x, [0, 1, 2, 3], 1e-3)
    assert torch.isfinite(a).all() and after <= before
    zero, b0, b1 = prune.refit(w, torch.zeros(5, 5, dtype=torch.float64), [0, 1], 1e-3)
    assert torch.isfinite(zero).all()


def test_importance_writes_statistics_that_prune_uses(olmo_dir, text_file, tmp_path):
    scores = tmp_path / "scores.pt"
    s = ia.main([f"MODEL={olmo_dir}", f"DATASET={text_file}", "NUM_SAMPLES=4", "SEQ_LEN=32",
                 "BATCH_SIZE=2", "LOSS_SAMPLES=0", f"OUTPUT={scores}"])
    pair = s["meta"]["gram"].pop("id")  # the Gram file carries the same id (prune checks it)
    assert s["meta"]["gram"] == {"file": "scores.gram.safetensors", "tokens": 4 * 32}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "scores.gram.safetensors"), "pt") as f:
        assert f.metadata()["id"] == pair
    from safetensors import safe_open
    with safe_open(str(tmp_path / "scores.gram.safetensors"), "pt") as f:
        assert f.get_tensor("mlp.3").shape == (96, 96) and f.get_tensor("attention.0").shape == (64, 64)
    args = [f"SCORES={scores}", f"DATASET={text_file}", "NUM_SAMPLES=2", "SEQ_LEN=32",
            "TARGET_FFN=48", "TARGET_HEADS=2"]
    on = prune.main([*args, f"OUTPUT={tmp_path / 'on'}"])
    off = prune.main([*args, "REPAIR=False", f"OUTPUT={tmp_path / 'off'}"])
    rec = common.read_record(tmp_path / "on")
    assert set(rec["repair"]) == {"mlp", "attention"}
    assert common.read_record(tmp_path / "off")["repair"] is None
    assert on["results"][0]["metrics"]["kl"] < off["results"][0]["metrics"]["kl"]
    (tmp_path / "scores.gram.safetensors").unlink()
    with pytest.raises(common.UserError, match="repair statistics .* are missing"):
        prune.main([*args, f"OUTPUT={tmp_path / 'on'}"])
    with recipe(ia, _GRAM_ROWS=0):
        s = ia.main([f"MODEL={olmo_dir}", f"DATASET={text_file}", "NUM_SAMPLES=4", "SEQ_LEN=32",
                     "LOSS_SAMPLES=0", f"OUTPUT={tmp_path / 'bare.pt'}"])
    assert s["meta"]["gram"] is None and not (tmp_path / "bare.gram.safetensors").exists()


def test_scores_of_a_saved_model_and_its_grams_agree(tmp_path, text_file):
    """The Gram's diagonal and the mlp score describe the same activations: a neuron that
    never fires has a zero Gram row."""
    model = make_model(olmo3_config())
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[7] = 0
        model.model.layers[1].mlp.up_proj.weight[7] = 0
    model_dir = save_model(model, tmp_path / "m")
    s = ia.main([f"MODEL={model_dir}", f"DATASET={text_file}", "NUM_SAMPLES=2", "SEQ_LEN=32",
                 "LOSS_SAMPLES=0", f"OUTPUT={tmp_path / 's.pt'}"])
    grams = prune.open_grams(str(tmp_path / "s.pt"), s["meta"])
    g = grams("mlp", 1)
    assert s["mlp"][1, 7] == 0 and g[7].abs().max() == 0 and g.diagonal().min() == 0
    assert torch.allclose(g, g.T)


@pytest.mark.parametrize("make_config", [olmo3_config, wide_gqa_llama, mha_llama],
                         ids=["olmo3", "llama-gqa", "llama-mha"])
def test_the_head_surgeon_drops_a_planted_redundant_head_exactly(make_config):
    """Query heads that are copies of each other (same query rows, same keys and values) write
    the same output: one of each pair can go and its o_proj columns fold into the other's.
    Olmo 3 (MHA, 4 heads): 3 copies 1, 3 heads kept. Llama MHA: 3 copies 1 and 2 copies 0, 2
    kept. Llama GQA (2 kv groups of 4): heads come in pairs of copies, 2 kept per group. The
    activation ranking, which scores one pair per group highest, keeps both of it; the surgeon
    keeps one of each pair (Llama's config needs the hidden size to divide by the heads).
    Llama: exactly. Olmo 3's q/k norms run over the whole projection, so a head fewer changes
    every head's normalisation: not exact there, but far better than the ranking's choice."""
    config = make_config()
    model = make_model(config)
    hd = config.hidden_size // config.num_attention_heads
    mha = config.num_key_value_heads == config.num_attention_heads
    pairs, heads, high = {"olmo3": ([(1, 3)], 3, [1, 3]), "mha": ([(1, 3), (0, 2)], 2, [1, 3]),
                          "gqa": ([(0, 1), (2, 3), (4, 5), (6, 7)], 4, [0, 1, 4, 5])}[
        "olmo3" if config.model_type == "olmo3" else "mha" if mha else "gqa"]

    def copy_rows(w, keep, copy):
        w[copy * hd:(copy + 1) * hd] = w[keep * hd:(keep + 1) * hd]
    with torch.no_grad():
        for block in model.model.layers:
            a = block.self_attn
            for keep, copy in pairs:
                copy_rows(a.q_proj.weight, keep, copy)
                if mha:  # each head its own kv head: copy those too (and Olmo's norm gains)
                    copy_rows(a.k_proj.weight, keep, copy)
                    copy_rows(a.v_proj.weight, keep, copy)
                if config.model_type == "olmo3":
                    copy_rows(a.q_norm.weight, keep, copy)
                    copy_rows(a.k_norm.weight, keep, copy)
    scores = fake_scores(model.config)
    scores["attention"][:, high] = scores["attention"].max() + 1  # both of a pair look best
    grams = grams_of(model, ids(8, 24, seed=1))
    x = ids(2, 20, seed=5)
    repaired, plan = cut(model, scores, grams, damping=1e-10, num_attention_heads=heads)
    by_score, _ = cut(model, scores, grams, damping=1e-10, select=False, num_attention_heads=heads)
    for kept in plan["heads"]:
        assert all(len({keep, copy} & set(kept)) == 1 for keep, copy in pairs), kept
    with torch.no_grad():
        want, got, other = (m(input_ids=x).logits for m in (model, repaired, by_score))
    if config.model_type == "olmo3":
        assert (other - want).abs().max() > 3 * (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (other - want).abs().max() > 100 * (got - want).abs().max()
