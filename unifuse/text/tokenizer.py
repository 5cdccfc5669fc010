"""Text tokenizers. Ids occupy [0, vocab_size) of the unified vocabulary (see vocab.py).

``ByteTokenizer`` (default) needs no files: UTF-8 bytes are the ids. ``BPETokenizer`` wraps a
HF ``tokenizers`` byte-level BPE trained on the shards' own text and saved as JSON
(``python -m unifuse.data bpe ...``); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol


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
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"BPE tokenizer file {path} not found; train one with "
                "`python -m unifuse.data bpe --shards <dir> --out <file.json>` or use the byte tokenizer"
            )
        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def to_config(self) -> dict:
        return {"kind": "bpe", "path": str(self.path)}

    @staticmethod
    def train(texts: Iterator[str], out: str | Path, vocab_size: int = 4096) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
        return BPETokenizer(out)


def load_tokenizer(cfg: dict | None) -> TextTokenizer:
    """Rebuild a tokenizer from the dict stored in checkpoints ({'kind': 'byte'|'bpe', 'path': ...})."""
    if not cfg or cfg.get("kind", "byte") == "byte":
        return ByteTokenizer()
    if cfg["kind"] == "bpe":
        return BPETokenizer(cfg["path"])
    raise ValueError(f"unknown tokenizer kind {cfg['kind']!r}")
