"""The unified vocabulary layout: the one place that says which id means what.

Layout (contiguous ranges, in this order)::

    [0, text_size)                      text tokens (bytes by default, or BPE ids)
    BOS, EOS, PAD, BOI, EOI,            special tokens, one id each
    VID_START, VID_END, MASK
    [class_offset, +num_classes)        class tokens (class-conditional generation)
    [image_offset, +image_codes)        image codes of the VQ tokenizer

The layout is saved with every checkpoint (``to_dict``) and checked on load
(``check_compatible``): a generator trained against one layout must not silently decode ids
of another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SPECIALS = ("BOS", "EOS", "PAD", "BOI", "EOI", "VID_START", "VID_END", "MASK")

# the modality of a sequence position (the collator's ``modality``): text and special tokens, image
TEXT, IMAGE = 0, 1


@dataclass(frozen=True)
class VocabLayout:
    text_size: int = 256
    image_codes: int = 0
    num_classes: int = 0
    specials: tuple[str, ...] = field(default=SPECIALS)

    def __post_init__(self) -> None:
        if self.text_size <= 0 or self.image_codes < 0 or self.num_classes < 0:
            raise ValueError(f"invalid vocabulary layout: {self}")
        if tuple(self.specials) != SPECIALS:
            raise ValueError(f"unknown special-token set {self.specials}; expected {SPECIALS}")

    # --- ids of the special tokens -------------------------------------------------------
    def special(self, name: str) -> int:
        return self.text_size + self.specials.index(name)

    @property
    def bos(self) -> int:
        return self.special("BOS")

    @property
    def eos(self) -> int:
        return self.special("EOS")

    @property
    def pad(self) -> int:
        return self.special("PAD")

    @property
    def boi(self) -> int:
        return self.special("BOI")

    @property
    def eoi(self) -> int:
        return self.special("EOI")

    @property
    def vid_start(self) -> int:
        return self.special("VID_START")

    @property
    def vid_end(self) -> int:
        return self.special("VID_END")

    @property
    def mask(self) -> int:
        return self.special("MASK")

    # --- ranges ------------------------------------------------------------------------------
    @property
    def class_offset(self) -> int:
        return self.text_size + len(self.specials)

    @property
    def image_offset(self) -> int:
        return self.class_offset + self.num_classes

    @property
    def size(self) -> int:
        return self.image_offset + self.image_codes

    def class_token(self, cls: int) -> int:
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"class {cls} outside [0, {self.num_classes})")
        return self.class_offset + cls

    def image_range(self) -> tuple[int, int]:
        return self.image_offset, self.image_offset + self.image_codes

    def code_to_id(self, codes):
        """VQ code indices -> vocabulary ids (works on ints, numpy arrays and tensors)."""
        return codes + self.image_offset

    def id_to_code(self, ids):
        return ids - self.image_offset

    def is_text(self, ids):
        return ids < self.text_size

    def is_image(self, ids):
        lo, hi = self.image_range()
        return (ids >= lo) & (ids < hi)

    # --- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["specials"] = list(self.specials)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VocabLayout:
        d = dict(d)
        d["specials"] = tuple(d.get("specials", SPECIALS))
        return cls(**d)

    def check_compatible(self, other: VocabLayout | dict, what: str = "checkpoint") -> None:
        if isinstance(other, dict):
            other = VocabLayout.from_dict(other)
        if other != self:
            diff = {k: (v, getattr(other, k)) for k, v in asdict(self).items() if getattr(other, k) != v}
            raise ValueError(f"vocabulary layout of the {what} differs from the configured one: {diff}")
