"""The GPT-2/CLIP byte-level BPE byte map, shared by the shapes tokenizer and the tiny test tokenizers."""

from __future__ import annotations

BOS = "<|startoftext|>"  # CLIP's special tokens, last in the vocabulary
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable-unicode map (256 entries; openai/CLIP ``simple_tokenizer.py``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_level_vocab() -> dict[str, int]:
    """A minimal CLIP BPE vocabulary that can encode any text.

    The 256 byte symbols, their ``</w>`` (end-of-word) variants, then ``<|startoftext|>`` and
    ``<|endoftext|>`` last, as in the real CLIP vocab (so EOS has the highest id).
    """
    symbols = sorted(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab
