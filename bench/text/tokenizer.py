"""The real CLIP tokenizer, offline: `transformers.CLIPTokenizer` built from OpenAI's BPE merge list, which ships
with the package (bench/assets/clip/, copied from the open-clip-torch wheel), instead of fetched from the Hub.

The vocabulary is derived from the merges as CLIP's own `simple_tokenizer.py` derives it: the 256 byte symbols,
the same with the end-of-word mark `</w>`, one token per merge (the first 48,894 merges of the file), then
`<|startoftext|>` and `<|endoftext|>`: 49,408 tokens, the ids of `openai/clip-vit-*` and Stable Diffusion 1.x.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

from bench.errors import BenchError

BPE_FILE = Path(__file__).parents[1] / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
MERGES = (
    49152 - 256 - 2
)  # the merges CLIP uses: its vocabulary is 49,408 = 2 x 256 bytes + merges + 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable character map, in CLIP's order: the printable Latin-1 bytes as
    themselves, then the other 68 bytes as the characters from U+0100 on, so that every byte has a visible symbol
    the BPE can merge."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def vocab_and_merges(path: Path = BPE_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The token -> id map and the ranked merges, derived from the gzipped merge list."""
    try:
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BenchError(f"CLIP BPE vocabulary {path} is missing or damaged ({e}): restore it from the repository "
                         "(bench/assets/clip/SOURCE.md says where it comes from)") from e  # fmt: skip
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]  # line 0 is the file's version header
    if len(merges) != MERGES or any(len(m) != 2 for m in merges):
        raise BenchError(f"CLIP BPE vocabulary {path}: expected {MERGES} merges of two symbols each")
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


@cache
def clip_tokenizer():
    """transformers' CLIPTokenizer with the real vocabulary: pads with <|endoftext|> to CLIP's 77 tokens, as
    Stable Diffusion's pipelines call it."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
