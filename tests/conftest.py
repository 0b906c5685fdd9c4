"""Hermetic fixtures: tiny random Olmo 3 and Llama-with-GQA models, a tokenizer, local data."""

import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT = """The quick brown fox jumps over the lazy dog. A small model learns from a big one.
Pruning removes neurons, heads and layers that matter least; distillation repairs the rest.
Calibration data should look like what the model saw last: for an instruct model, chat turns.
""" * 3

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}")


def make_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained on TEXT, with eos, pad and a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)


def olmo3_config(**kw):
    from transformers import Olmo3Config
    args = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                sliding_window=8, rms_norm_eps=1e-6, tie_word_embeddings=False,
                layer_types=["sliding_attention"] * 3 + ["full_attention"],
                pad_token_id=1, eos_token_id=0, bos_token_id=None)
    args.update(kw)
    return Olmo3Config(**args)


def llama_config(**kw):
    from transformers import LlamaConfig
    args = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=1, eos_token_id=0,
                bos_token_id=None)
    args.update(kw)
    return LlamaConfig(**args)


def make_model(config, seed=0):
    """A random model with its norms' gains jittered, so every weight carries information."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_model(model, path):
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def no_downstream_suite():
    """prune.py and distill.py score a small downstream suite by default; in-process tests run
    without it (tests/test_evaluate.py turns it on where it is the subject)."""
    import distill
    import prune
    with recipe(distill, _EVAL_TASKS=[]), recipe(prune, _EVAL_TASKS=[]):
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def olmo_dir(tmp_path_factory):
    return save_model(make_model(olmo3_config()), tmp_path_factory.mktemp("olmo"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_model(make_model(llama_config()), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny confident Olmo 3 teacher (distill's tests; helpers in test_distill.py)."""
    from test_distill import make_teacher
    return save_model(make_teacher(), tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory):
    """Width-pruned student (ffn 96 -> 48, all 4 layers): no hidden-state loss."""
    from test_distill import make_teacher, prune_like, write_student
    layers = [0, 1, 2, 3]
    return write_student(teacher_dir, prune_like(make_teacher(), layers, ffn=48), layers,
                         tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(TEXT.splitlines() * 20), encoding="utf-8")
    return str(path)


@contextlib.contextmanager
def recipe(module, **values):
    """Set some of a script's recipe constants (`_NAME`) for the duration of a block."""
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def split_args(args):
    """(knob overrides, {recipe constant: value}) from NAME=value strings; `_NAME` are recipe."""
    import ast

    def value(raw):
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw  # a bare word is a string, as for knobs
    knobs = [a for a in args if not a.startswith("_")]
    private = {a.partition("=")[0]: value(a.partition("=")[2]) for a in args if a.startswith("_")}
    return knobs, private


def script_cmd(script, *args):
    """The command that runs `script` (e.g. 'distill.py') as a user would, with `_NAME=value`
    recipe constants set through tests/patched.py."""
    import shutil
    knobs, private = split_args(args)
    uv = shutil.which("uv")
    run = [uv, "run"] if uv else [sys.executable]
    if not private:
        return [*run, script, *knobs]
    return [*run, "tests/patched.py", script.removesuffix(".py"),
            *[f"{k}={v!r}" for k, v in private.items()], "--", *knobs]
