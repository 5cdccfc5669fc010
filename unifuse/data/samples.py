"""Safe decoding of webdataset samples.

A raw sample is what webdataset's tar grouping yields: ``{"__key__", "__url__", ext: bytes}``.
Only these members are ever decoded: images (jpg/jpeg/png/webp, also indexed as ``0.png``),
``txt``, ``json``, ``cls`` and ``npy`` (``allow_pickle=False``). Anything else (``.pyd``,
``.pickle``, ``.pth`` ...) is ignored byte-for-byte: nothing from a shard is ever unpickled.

Bad samples raise :class:`SkipSample` with a reason; the stream counts reasons and goes on.
Images are converted to RGB where that is meaningful (RGBA/LA/P composited on white, L, CMYK,
16-bit) and the conversion is counted too.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAFE_EXTS = frozenset(IMAGE_EXTS + ("txt", "json", "cls", "npy"))
_INDEXED_IMAGE = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp)$")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DecodeConfig:
    """What a sample must contain and how images are normalised."""

    image_size: int | None = None  # resize (shorter side) + center crop to this; None keeps the size
    require_caption: bool = False  # skip pairs whose caption is missing or empty
    require_image: bool = False
    max_pixels: int = 64_000_000  # larger images are absurd (decompression bombs)
    min_side: int = 4
    max_aspect: float = 20.0


@dataclass
class Sample:
    key: str
    url: str
    images: list[np.ndarray] = field(default_factory=list)  # HxWx3 uint8
    text: str | None = None
    segments: list[dict] | None = None  # interleaved: [{"text": str} | {"image": int}]
    cls: int | None = None
    codes: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.segments is not None:
            return "interleaved"
        if self.images and self.text:
            return "pair"
        if self.images or self.codes is not None:
            return "image"
        return "text"


def _to_rgb(im: Image.Image, stats: Counter) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    stats[f"converted_{mode}"] += 1
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.int64)
        hi = 65535 if mode.startswith("I;16") or a.max() > 255 else 255
        a = (np.clip(a, 0, hi) * (255.0 / hi)).round().astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = np.clip(a if a.max() > 1.0 else a * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
    if mode in ("RGBA", "LA", "La", "RGBa", "P", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def resize_square(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic, or box when shrinking a lot) and center-crop."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if s > 0.5 else 2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_image(data: bytes, cfg: DecodeConfig, stats: Counter) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Exception as e:  # not an image at all
        raise SkipSample("corrupt_image", repr(e)) from None
    if (
        w < cfg.min_side
        or h < cfg.min_side
        or w * h > cfg.max_pixels
        or max(w, h) / max(1, min(w, h)) > cfg.max_aspect
    ):
        raise SkipSample("absurd_dimensions", f"{w}x{h}")
    try:
        im.load()
        im = _to_rgb(im, stats)
    except Exception as e:  # truncated or corrupt pixel data
        raise SkipSample("corrupt_image", repr(e)) from None
    if cfg.image_size:
        im = resize_square(im, cfg.image_size)
    return np.asarray(im, dtype=np.uint8)


def image_batch(images: list[np.ndarray]) -> torch.Tensor:
    """Decoded images (H, W, C uint8 arrays of one size) -> one contiguous (N, C, H, W) uint8 tensor.

    Contiguous, not a permuted view: a view keeps the channels-last memory layout, convolutions
    carry it through the network, and on CPU the emoji autoencoders' bf16 training steps ran 1.3x
    (VQ) and 1.8x (KL) slower in it (``experiments/bench/autoencoders.py``)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def decode_sample(raw: dict, cfg: DecodeConfig, stats: Counter) -> Sample:
    """Decode a raw webdataset sample. Raises SkipSample; counts conversions in ``stats``."""
    s = Sample(key=str(raw.get("__key__")), url=str(raw.get("__url__", "")))
    images: dict[int, np.ndarray] = {}
    for ext, value in raw.items():
        if ext.startswith("__"):
            continue
        if ext not in SAFE_EXTS and not _INDEXED_IMAGE.match(ext):
            stats["ignored_member"] += 1  # never decoded, whatever it is (pickles included)
            continue
        if ext in IMAGE_EXTS:
            images[0] = decode_image(value, cfg, stats)
        elif m := _INDEXED_IMAGE.match(ext):
            images[int(m.group(1))] = decode_image(value, cfg, stats)
        elif ext == "txt":
            s.text = value.decode("utf-8", errors="replace").strip()
        elif ext == "json":
            try:
                s.meta = json.loads(value)
            except Exception as e:
                raise SkipSample("bad_json", repr(e)) from None
            if not isinstance(s.meta, dict):
                raise SkipSample("bad_json", "top level is not an object")
        elif ext == "cls":
            try:
                s.cls = int(value.decode().strip())
            except Exception:
                raise SkipSample("bad_cls", repr(value[:20])) from None
        elif ext == "npy":
            try:
                s.codes = np.load(io.BytesIO(value), allow_pickle=False)
            except Exception as e:
                raise SkipSample("bad_npy", repr(e)) from None
    segments = s.meta.get("segments") if s.meta else None
    if segments is not None:
        s.segments = _check_segments(segments, images)
        order = [seg["image"] for seg in s.segments if "image" in seg]
        s.images = [images[i] for i in order]
        if not s.text:
            s.text = " ".join(seg["text"] for seg in s.segments if "text" in seg)
    else:
        s.images = [images[i] for i in sorted(images)]
        if s.text is None and isinstance(s.meta.get("caption"), str):
            s.text = s.meta["caption"].strip()
        if cfg.require_caption and not s.text:
            raise SkipSample("missing_caption")
    if cfg.require_image and not s.images and s.codes is None:
        raise SkipSample("missing_image")
    if not s.images and not s.text and s.codes is None:
        raise SkipSample("empty_sample")
    return s


def _check_segments(segments, images: dict[int, np.ndarray]) -> list[dict]:
    if not isinstance(segments, list):
        raise SkipSample("bad_segments", "segments is not a list")
    out = []
    for seg in segments:
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            out.append({"text": seg["text"]})
        elif isinstance(seg, dict) and isinstance(seg.get("image"), int):
            if seg["image"] not in images:
                raise SkipSample("missing_image", f"segment refers to image {seg['image']}")
            out.append({"image": seg["image"]})
        else:
            raise SkipSample("bad_segments", repr(seg)[:80])
    return out
