"""Text tokenizers. Ids occupy [0, vocab_size) of the unified vocabulary (see vocab.py).

``ByteTokenizer`` (default) needs no files: UTF-8 bytes are the ids. ``BPETokenizer`` wraps a
HF ``tokenizers`` byte-level BPE trained on the shards' own text and saved as JSON
(``python -m unifuse.data bpe ...``); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from unifuse.run.progress import interactive, progress


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_config(self) -> dict:
        return {"kind": "byte"}


class BPETokenizer:
    """A HF ``tokenizers`` BPE, from its JSON file or from the JSON text itself (what checkpoints
    store, so a generator checkpoint needs no tokenizer file on the machine that loads it)."""

    def __init__(self, path: str | Path | None = None, *, json_text: str | None = None):
        from tokenizers import Tokenizer

        if json_text is None:
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(
                    f"BPE tokenizer file {path} not found; train one with "
                    "`python -m unifuse.data bpe --shards <dir> --out <file.json>` or use the byte tokenizer"
                )
            json_text = Path(path).read_text(encoding="utf-8")
        self.path = Path(path) if path is not None else None
        self.json_text = json_text
        self._tok = Tokenizer.from_str(json_text)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_config(self) -> dict:
        """The vocabulary itself (not only its path): checkpoints that carry it travel."""
        return {"kind": "bpe", "path": str(self.path) if self.path else None, "json": self.json_text}

    @staticmethod
    def train(texts: Iterator[str], out: str | Path, vocab_size: int = 4096) -> BPETokenizer:
        """Train on ``texts`` (reading them reports progress; so do the merges on a terminal)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=interactive()
        )
        tok.train_from_iterator(progress(texts, desc="BPE: read texts", unit="text"), trainer=trainer)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
        return BPETokenizer(out)


def load_tokenizer(cfg: dict | None) -> TextTokenizer:
    """Rebuild a tokenizer from the dict stored in checkpoints ({'kind': 'byte'|'bpe', 'json': ...};
    checkpoints written before the vocabulary was stored name only its 'path')."""
    if not cfg or cfg.get("kind", "byte") == "byte":
        return ByteTokenizer()
    if cfg["kind"] == "bpe":
        return BPETokenizer(cfg.get("path"), json_text=cfg.get("json"))
    raise ValueError(f"unknown tokenizer kind {cfg['kind']!r}")
