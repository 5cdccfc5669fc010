from __future__ import annotations

import numpy as np
import pytest
import torch

from unifuse.text.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from unifuse.text.vocab import SPECIALS, VocabLayout


def test_layout_ranges_are_disjoint_and_cover_the_vocabulary():
    v = VocabLayout(text_size=256, image_codes=1024, num_classes=10)
    ids = [range(0, v.text_size), [v.special(n) for n in SPECIALS],
           range(v.class_offset, v.class_offset + 10), range(*v.image_range())]
    flat = [i for r in ids for i in r]
    assert sorted(flat) == list(range(v.size)) and len(flat) == len(set(flat))
    assert v.bos == 256 and v.mask == 263 and v.class_token(3) == 267 and v.image_offset == 274
    codes = torch.tensor([0, 5, 1023])
    assert torch.equal(v.id_to_code(v.code_to_id(codes)), codes)
    assert v.is_image(v.code_to_id(codes)).all() and not v.is_image(torch.tensor([v.eoi, 0])).any()
    with pytest.raises(ValueError):
        v.class_token(10)


def test_layout_round_trip_and_mismatch_is_named():
    v = VocabLayout(text_size=4096, image_codes=8192, num_classes=0)
    assert VocabLayout.from_dict(v.to_dict()) == v
    v.check_compatible(v.to_dict())
    with pytest.raises(ValueError, match="image_codes"):
        v.check_compatible(VocabLayout(text_size=4096, image_codes=1024))


@pytest.mark.parametrize("text", ["dog face", "héllo wörld", "🙂 emoji", ""])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert isinstance(load_tokenizer({"kind": "byte"}), ByteTokenizer)


def test_bpe_train_save_load_round_trip(tmp_path):
    texts = [f"grinning face number {i} with smiling eyes" for i in range(200)] + ["red heart", "dog face"]
    tok = BPETokenizer.train(iter(texts), tmp_path / "bpe.json", vocab_size=300)
    again = load_tokenizer(tok.to_config())
    for t in ["grinning face with smiling eyes", "dog face", "unseen wörds 🙂"]:
        assert again.decode(again.encode(t)) == t
    assert len(tok.encode("grinning face")) < len("grinning face")  # merges learned
    assert np.all(np.array(tok.encode("dog face")) < tok.vocab_size)


def test_bpe_missing_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="unifuse.data bpe"):
        BPETokenizer(tmp_path / "nope.json")


def test_bpe_from_shards_builds_the_data_then_trains_once(tmp_path, monkeypatch):
    """A preset's BPE on a fresh clone: the embedded dataset is built, the vocabulary trained on its
    captions and written whole; later calls load it without training again."""
    from unifuse.data import builders
    from unifuse.data.read import iter_texts

    out = tmp_path / "emoji16" / "bpe-300.json"
    args = {"size": 16, "limit": 20, "val_percent": 20.0, "shard_size": 40}
    tok = builders.bpe_from_shards(out, str(tmp_path / "emoji16" / "train"), 300, build="emoji", build_args=args)
    assert out.is_file() and not list(out.parent.glob("*.tmp-*"))
    assert (tmp_path / "emoji16" / "val").is_dir()
    caption = next(iter_texts(str(tmp_path / "emoji16" / "train")))
    face = tok.encode(caption)
    assert len(face) < len(caption.encode()) / 2 and tok.decode(face) == caption

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(builders.BPETokenizer, "train", staticmethod(no_training))
    assert builders.bpe_from_shards(out, str(tmp_path / "nowhere"), 300).encode(caption) == face
    with pytest.raises(ValueError, match="unknown embedded dataset 'emojis'"):
        builders.bpe_from_shards(tmp_path / "other.json", str(tmp_path / "x" / "train"), 300, build="emojis")
