from unifuse.text.tokenizer import BPETokenizer, ByteTokenizer, TextTokenizer, load_tokenizer
from unifuse.text.vocab import VocabLayout

__all__ = ["BPETokenizer", "ByteTokenizer", "TextTokenizer", "VocabLayout", "load_tokenizer"]
