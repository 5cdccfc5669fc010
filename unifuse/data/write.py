"""Creating shards from files: an image folder + captions file, or a jsonl of interleaved documents."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from unifuse.data.samples import IMAGE_EXTS, resize_square
from unifuse.data.shards import ShardWriter, WriteSummary

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def _key(i: int, hint: str) -> str:
    return f"{i:08d}_{_KEY_BAD.sub('_', Path(hint).stem)[:40]}"


def _image_member(path: Path, resize: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of an image file; verified, and re-encoded as PNG when resizing."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    ext = path.suffix.lower().lstrip(".")
    if resize is None and ext in IMAGE_EXTS:
        return ("jpg" if ext == "jpeg" else ext), data
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGBA") if im.mode in ("P", "LA", "RGBA") else im.convert("RGB")
        if resize:
            im = resize_square(im, resize)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "png", buf.getvalue()


def _read_captions(path: Path) -> Iterator[dict]:
    """Rows with 'image' (or 'file'/'path'/'filename'), 'caption' (or 'text'), optional 'cls'."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        with path.open(newline="") as f:
            yield from csv.DictReader(f)


def write_pairs(images: str | Path, captions: str | Path, out: str | Path, shard_size: int = 10_000,
                resize: int | None = None, prefix: str = "pairs") -> WriteSummary:
    images, captions = Path(images), Path(captions)
    rows = list(_read_captions(captions))
    w = ShardWriter(out, prefix=prefix, max_samples=shard_size)
    for i, row in enumerate(tqdm(rows, desc="write pairs", unit="sample")):
        name = next((row[k] for k in ("image", "file", "path", "filename") if row.get(k)), None)
        caption = next((row[k] for k in ("caption", "text") if row.get(k) is not None), None)
        if not name:
            w.summary.skipped["no_image_column"] += 1
            continue
        if caption is None or not str(caption).strip():
            w.summary.skipped["missing_caption"] += 1
            continue
        path = Path(name) if Path(name).is_absolute() else images / name
        if not path.is_file():
            w.summary.skipped["missing_file"] += 1
            continue
        try:
            ext, data = _image_member(path, resize)
        except Exception:
            w.summary.skipped["unreadable_image"] += 1
            continue
        members = {ext: data, "txt": str(caption).strip(),
                   "json": {k: v for k, v in row.items() if k not in ("image", "file", "path", "filename")}}
        if row.get("cls") not in (None, ""):
            members["cls"] = int(row["cls"])
        w.write(_key(i, name), members)
    return w.close()


def write_interleaved(docs: str | Path, out: str | Path, shard_size: int = 10_000, resize: int | None = None,
                      prefix: str = "docs") -> WriteSummary:
    """jsonl lines: ``{"segments": [{"text": "..."}, {"image": "path.png"}, ...]}`` or ``{"text": "..."}``.
    Image paths are relative to the jsonl file's folder unless absolute."""
    docs = Path(docs)
    base = docs.parent
    w = ShardWriter(out, prefix=prefix, max_samples=shard_size)
    lines = [ln for ln in docs.read_text().splitlines() if ln.strip()]
    for i, line in enumerate(tqdm(lines, desc="write documents", unit="doc")):
        try:
            doc = json.loads(line)
        except ValueError:
            w.summary.skipped["bad_json"] += 1
            continue
        if isinstance(doc.get("text"), str) and "segments" not in doc:
            w.write(f"{i:08d}", {"txt": doc["text"], "json": {"segments": [{"text": doc["text"]}]}})
            continue
        segs, members, n_img, ok = [], {}, 0, True
        for seg in doc.get("segments") or []:
            if isinstance(seg.get("text"), str):
                segs.append({"text": seg["text"]})
            elif isinstance(seg.get("image"), str):
                p = Path(seg["image"]) if Path(seg["image"]).is_absolute() else base / seg["image"]
                try:
                    ext, data = _image_member(p, resize)
                except Exception:
                    ok = False
                    break
                members[f"{n_img}.{ext}"] = data
                segs.append({"image": n_img})
                n_img += 1
        if not ok:
            w.summary.skipped["unreadable_image"] += 1
            continue
        if not segs:
            w.summary.skipped["empty_document"] += 1
            continue
        members["json"] = {"segments": segs}
        w.write(f"{i:08d}", members)
    return w.close()
