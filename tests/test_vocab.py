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
