"""Local English text for the benchmarks and real-model checks, with no download.

    uv run bench/bench_corpus.py DIR      # writes DIR/calib.txt, DIR/eval.txt and DIR/vim.txt

The text is the Python language reference that ships with CPython (`pydoc_data.topics`):
English technical prose, about 1 MB. Topics are split into two disjoint halves (sorted by name,
alternating), so calibration and evaluation never share a document. Documents are separated by
blank lines, the .txt format `common.calibration_rows` reads.
"""

import sys
from pathlib import Path


def write_corpus(out_dir) -> tuple[str, str]:
    from pydoc_data.topics import topics
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(topics)
    paths = []
    for part, chosen in (("calib", names[0::2]), ("eval", names[1::2])):
        docs = [" ".join(topics[n].split()) for n in chosen]  # one paragraph per topic
        path = out / f"{part}.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]


def other_domain(out_dir) -> str:
    """Held-out text of another domain than the calibration text: Vim's user manual (the
    usr_*.txt files Debian's vim ships), paragraphs as documents; OUT_DIR/vim.txt."""
    files = sorted(Path("/").glob("usr/share/vim/vim*/doc/usr_*.txt"))
    if not files:
        raise SystemExit("no Vim user manual under /usr/share/vim (apt-get install vim-runtime)")
    paras = [" ".join(p.split()) for f in files for p in f.read_text(errors="replace").split("\n\n")]
    path = Path(out_dir) / "vim.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(p for p in paras if len(p) > 200) + "\n", encoding="utf-8")
    return str(path)


def corpus_tokenizer(text: str, vocab_size: int = 4000):
    """A word-level tokenizer of the text's most common words, with eos (id 0) and pad (id 1),
    for the random models the benchmarks build when SmolLM2 is not installed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<unk>")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "out/corpus"
    print("\n".join(write_corpus(out)))
    try:  # only the benchmarks that measure on another domain need it
        print(other_domain(out))
    except SystemExit as e:
        print(f"note: {e}; vim.txt not written", file=sys.stderr)
