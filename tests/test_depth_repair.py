"""The depth repair: a dropped layer folded into the layer kept before it. Exact where it can be
(tiny Llama and Olmo 3 with a planted dropped layer), never worse than the plain cut on its
check tokens, the identity when nothing is dropped, a clean fallback on singular statistics,
and wired through prune.py into checkpoints that load strictly and generate."""

import pytest
import torch

import common
import depth_repair
import prune
from conftest import llama_config, make_model, olmo3_config, save_model
from test_prune import fake_scores, ids, logits, run_main

MAKERS = pytest.mark.parametrize("make_config", [olmo3_config, llama_config],
                                 ids=["olmo3", "llama-gqa"])


def plant(model, drop: int, mix: torch.Tensor) -> list:
    """Make layer `drop` add a function of what layer drop-1's MLP wrote (M) to the stream,
    and nothing else: M @ mix for a matrix, M * mix for a vector (per channel). Hooks; the
    caller removes them."""
    family = common.family_of(model.config)
    prev = model.model.layers[drop - 1]
    site = getattr(prev, family.mlp_norm) if family.post_norm else prev.mlp
    grab = {}

    def update(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        new = h + (grab["m"] @ mix if mix.dim() == 2 else grab["m"] * mix)
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return [site.register_forward_hook(lambda mod, args, out: grab.update(m=out)),
            model.model.layers[drop].register_forward_hook(update, with_kwargs=True)]


def echo_layer(model, src: int, dst: int):
    """Layer `dst` repeats layer `src`'s MLP (same weights and MLP norm gain) and its attention
    writes nothing: its update is nearly a function of what `src`'s MLP read, so a refit of
    `src` carries most of it also on tokens the fit never saw (a random layer's update is noise
    no linear map predicts)."""
    family = common.family_of(model.config)
    a, b = model.model.layers[src], model.model.layers[dst]
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(b.mlp, name).weight.copy_(getattr(a.mlp, name).weight)
        getattr(b, family.mlp_norm).weight.copy_(getattr(a, family.mlp_norm).weight)
        b.self_attn.o_proj.weight.zero_()


def cut(model, layers, rows=None, damping=1e-10, **target):
    """prune_one keeping source `layers`, with the depth repair fitted on `rows` (None: none)."""
    src = common.shape_of(model.config)
    shape = {**src, "num_hidden_layers": len(layers), **target}
    depth = depth_repair.stats_source(model, rows, 4, 10 ** 6, {}) if rows is not None else None
    return prune.prune_one(model, fake_scores(model.config), shape, layers, torch.float32,
                           prune.Cut(depth=depth, damping=damping))


def test_dropped_runs():
    assert depth_repair.dropped_runs([0, 1, 2, 3], 4) == []
    assert depth_repair.dropped_runs([0, 3, 4, 7], 8) == [(1, 3), (5, 7)]
    assert depth_repair.dropped_runs([1, 2], 4) == [(0, 1), (3, 4)]


@MAKERS
def test_a_planted_dropped_layer_is_replaced_exactly(make_config):
    """Llama: the dropped layer adds M @ P (linear in the previous down projection's input):
    the refit down projection carries it exactly. Olmo 3 (post-norm): it adds M * d per channel,
    which the refit gain carries exactly through the norm. Logits match the source's to 1e-4;
    the plain cut is far off."""
    config = make_config()
    model = make_model(config)
    n, hidden = config.num_hidden_layers, config.hidden_size
    drop = n - 2  # an Olmo 3 sliding layer; Llama's middle layer
    g = torch.Generator().manual_seed(0)
    mix = (0.3 * torch.randn(hidden, hidden, generator=g) if not config.model_type == "olmo3"
           else torch.rand(hidden, generator=g) - 0.5)
    hooks = plant(model, drop, mix)
    x = ids(2, 20, seed=9)
    try:
        want = logits(model, x)
        keep = [i for i in range(n) if i != drop]
        repaired, plan = cut(model, keep, ids(8, 32, seed=1))
        plain, _ = cut(model, keep)
    finally:
        for h in hooks:
            h.remove()
    before, after = plan["repair"]["depth"]
    assert after < 1e-8 < before
    assert torch.allclose(logits(repaired, x), want, atol=1e-4), (logits(repaired, x) - want).abs().max()
    assert (logits(plain, x) - want).abs().max() > 1e-2


@MAKERS
def test_the_repair_never_makes_the_check_error_worse(make_config):
    """Where the dropped layer echoes the one before it, the fit lowers the error on tokens it
    did not see. Llama: a fit made useless (a huge ridge) is refused and the layer stays exactly
    as cut (Olmo 3 keeps the option of the refit gain alone, which the ridge does not touch)."""
    config = make_config()
    model = make_model(config)
    echo_layer(model, 1, 2)
    keep = [i for i in range(config.num_hidden_layers) if i != 2]
    rows = ids(8, 32, seed=1)
    repaired, plan = cut(model, keep, rows, damping=1e-3)
    before, after = plan["repair"]["depth"]
    assert after < before
    if config.model_type == "olmo3":  # the refit gain alone stays an option there
        return
    refused, plan = cut(model, keep, rows, damping=1e12)
    assert plan["repair"]["depth"][1] == plan["repair"]["depth"][0]
    plain, _ = cut(model, keep)
    a, b = plain.state_dict(), refused.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@MAKERS
def test_nothing_dropped_is_the_identity(make_config):
    model = make_model(make_config())
    n = model.config.num_hidden_layers
    new, plan = cut(model, list(range(n)), ids(4, 16, seed=1))
    a, b = model.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plan["repair"] == {}


@MAKERS
def test_singular_statistics_fall_back_to_the_cut(make_config):
    """The layer before the run writes nothing (its up projection is zero: z = 0, a zero Gram):
    no fit is possible, the layer stays as cut, nothing is NaN."""
    config = make_config()
    model = make_model(config)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    keep = [0, config.num_hidden_layers - 1]
    repaired, plan = cut(model, keep, ids(4, 16, seed=1), damping=1e-3)
    plain, _ = cut(model, keep)
    a, b = plain.state_dict(), repaired.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.isfinite(logits(repaired, ids())).all()


def test_a_run_from_layer_zero_is_left_as_cut(capsys):
    model = make_model(llama_config())
    repaired, plan = cut(model, [1, 2], ids(4, 16, seed=1))
    assert "layers 0-0 have no layer before them" in capsys.readouterr().out
    assert "depth" not in plan["repair"]


def test_with_width_cuts_too(capsys):
    """Depth and width at once (fewer neurons, hidden channels and heads): the fit runs on the
    kept neurons and hidden channels and still lowers the error."""
    model = make_model(llama_config(num_hidden_layers=4))
    echo_layer(model, 1, 2)
    repaired, plan = cut(model, [0, 1, 3], ids(8, 32, seed=1), damping=1e-3,
                         intermediate_size=64, hidden_size=48)
    before, after = plan["repair"]["depth"]
    assert after < before
    assert torch.isfinite(logits(repaired, ids())).all()


@pytest.fixture(scope="module", params=[olmo3_config, llama_config], ids=["olmo3", "llama-gqa"])
def echo_model(request, tmp_path_factory, text_file):
    """A tiny 4-layer model whose layer 2 echoes layer 1 (echo_layer), saved with its scores;
    the scores' skip losses name layer 2 the cheapest, so _DEPTH_METRIC='loss' drops it."""
    import importance_analysis as ia
    root = tmp_path_factory.mktemp("echo")
    model = make_model(request.param(num_hidden_layers=4))
    echo_layer(model, 1, 2)
    model_dir = save_model(model, root / "model")
    scores = root / "scores.pt"
    ia.main([f"MODEL={model_dir}", f"DATASET={text_file}", "NUM_SAMPLES=8", "SEQ_LEN=32",
             "LOSS_SAMPLES=2", f"OUTPUT={scores}"])
    s = torch.load(scores, weights_only=True)
    s["layer_loss"] = {i: (0.0 if i == 2 else 1.0) for i in range(4)}
    torch.save(s, scores)  # its Gram file stays paired (the id is in meta)
    return model_dir, str(scores), text_file


def test_prune_writes_a_depth_repaired_checkpoint_that_loads_strictly(echo_model, tmp_path, capsys):
    """TARGET_LAYERS with REPAIR on (the default): the record has the depth repair's errors, the
    checkpoint loads in transformers with no missing or unexpected keys and generates; with
    REPAIR=False the same layer is dropped without it, and the repaired model is closer to the
    source on the held-out rows."""
    from transformers import AutoModelForCausalLM
    model_dir, scores, data = echo_model
    repaired = run_main(model_dir, scores, data, tmp_path / "r", "TARGET_LAYERS=3",
                        "_DEPTH_METRIC='loss'")
    printed = capsys.readouterr().out
    assert "depth repair: fits on 8 calibration rows" in printed and "repair_depth:" in printed
    record = common.read_record(tmp_path / "r")
    before, after = record["repair"]["depth"]
    assert after < before and record["kept"]["layers"] == [0, 1, 3]
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "r", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    out = model.generate(ids(1, 5), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    plain = run_main(model_dir, scores, data, tmp_path / "p", "TARGET_LAYERS=3", "REPAIR=False",
                     "_DEPTH_METRIC='loss'")
    assert "depth" not in (common.read_record(tmp_path / "p")["repair"] or {})
    assert plain["results"][0]["plan"]["layers"] == record["kept"]["layers"]
    assert repaired["results"][0]["metrics"]["kl"] < plain["results"][0]["metrics"]["kl"]


def test_the_repair_changes_which_layer_block_drops(monkeypatch, capsys):
    """Layer 3 nearly does nothing (the cheapest to skip as it is); layer 2's update is linear in
    what layer 1's MLP wrote (costly to skip, free once repaired). Measured again with the
    repair, 'block' drops layer 2; the model's weights are put back after each measurement.
    (A random model's loss can fall when a layer is skipped, so the cost measured here is the
    distance to the source's logits.)"""
    model = make_model(llama_config(num_hidden_layers=4))
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.mul_(0.01)
        model.model.layers[3].mlp.down_proj.weight.mul_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mix = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) / 4
    hooks = plant(model, 2, mix)
    rows = ids(8, 32, seed=1)

    def skipping(skip):
        with common.skipping(model, skip):
            return logits(model, rows)
    want = skipping(())
    monkeypatch.setattr(common, "skip_loss", lambda m, r, b, skip=(): (
        (skipping(skip) - want).pow(2).mean().item()))
    try:
        costs = prune.block_costs(model, rows, 4, [2, 3], 1)
        assert min(costs, key=costs.get) == (3,)
        stats_of = depth_repair.stats_source(model, rows, 4, 10 ** 6, {})
        new = depth_repair.rerank(model, rows, 4, costs, 2, stats_of, 1e-10)
    finally:
        for h in hooks:
            h.remove()
    assert min(new, key=new.get) == (2,) and new[(2,)] < 1e-6 < costs[(3,)]
    assert "depth: skipping [2] costs" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
