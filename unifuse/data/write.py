"""Creating shards from files: an image folder (with a captions file, an HF image-folder
``metadata.jsonl``, or no captions at all), or a jsonl of interleaved documents.

Outputs are built in a partial directory next to ``out`` and moved into place when complete, so
an interrupted write never leaves shards that look finished."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from unifuse.data.samples import IMAGE_EXTS, resize_square
from unifuse.data.staging import Staging
from unifuse.data.writer import ShardWriter, WriteSummary
from unifuse.run.progress import progress

log = logging.getLogger("unifuse.data")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")
IMAGE_COLUMNS = ("image", "file_name", "file", "path", "filename")
FOLDER_IMAGE_EXTS = (*IMAGE_EXTS, "bmp", "gif", "tif", "tiff")  # the others are re-encoded as PNG
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face image-folder layout


def _key(i: int, hint: str) -> str:
    return f"{i:08d}_{_KEY_BAD.sub('_', Path(hint).stem)[:40]}"


def in_val(name: str, fraction: float) -> bool:
    """Whether the sample named ``name`` (its file name) belongs to the validation split: a stable
    hash (SHA-1), the same on every run and machine."""
    h = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16)
    return h < fraction * 2**32


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


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a csv, jsonl or plain list (``.txt``: one image file name a line)."""
    if path.suffix == ".jsonl":
        rows = []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"{path} line {n} is not a json object")
                    rows.append(row)
        return rows, list(dict.fromkeys(k for r in rows for k in r))
    if path.suffix == ".txt":
        rows = [{"image": ln.strip()} for ln in path.read_text().splitlines() if ln.strip()]
        return rows, ["image"]
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _caption_column(path: Path, columns: list[str], column: str | None, defaults: tuple[str, ...]) -> str | None:
    if column is not None:
        if column not in columns:
            raise ValueError(f"caption column {column!r} is not in {path} (its columns: {', '.join(columns)})")
        return column
    return next((c for c in defaults if c in columns), None)


@dataclass
class _Item:
    index: int
    name: str | None  # the image's file name as the source gives it (relative to the image folder)
    path: Path | None
    caption: str | None = None
    extra: dict = field(default_factory=dict)
    skip: str | None = None

    @property
    def ident(self) -> str | None:
        return os.path.normpath(os.path.abspath(self.path)) if self.path is not None else None


def _row_items(rows: list[dict], base: Path, prefix: str, caption_col: str | None, start: int) -> list[_Item]:
    items = []
    for i, row in enumerate(rows):
        name = next((str(row[k]) for k in IMAGE_COLUMNS if row.get(k) not in (None, "")), None)
        extra = {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}
        if name is None:
            items.append(_Item(start + i, None, None, extra=extra, skip="no_image_column"))
            continue
        path = Path(name) if Path(name).is_absolute() else base / name
        rel = name if Path(name).is_absolute() else str(PurePosixPath(prefix, name.replace(os.sep, "/")))
        caption = row.get(caption_col) if caption_col else None
        caption = str(caption).strip() if caption is not None and str(caption).strip() else None
        items.append(_Item(start + i, rel, path, caption, extra))
    return items


def find_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, hidden files and folders left out), sorted."""
    hits = [p for p in folder.rglob("*")
            if p.suffix.lower().lstrip(".") in FOLDER_IMAGE_EXTS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(hits, key=lambda p: p.relative_to(folder).as_posix())


def pair_items(images: Path, captions: Path | None = None,
               caption_column: str | None = None) -> tuple[list[_Item], bool, str]:
    """(samples, whether they are captioned, a description of the source) from a captions file,
    else the HF image-folder ``metadata.jsonl``/``.csv`` files found in ``images``, else every image
    file in ``images`` (image-only samples)."""
    if captions is not None:
        rows, cols = _read_rows(captions)
        col = _caption_column(captions, cols, caption_column, ("caption", "text"))
        if col is None:
            raise ValueError(f"no caption column in {captions} (looked for 'caption', 'text'; its columns: "
                             f"{', '.join(cols)}): name it with --caption-column, or leave out --captions to "
                             "write image-only samples")
        return _row_items(rows, images, "", col, 0), True, f"{captions} (captions: {col!r})"
    metas = sorted((p for name in METADATA_FILES for p in images.rglob(name)
                    if not any(part.startswith(".") for part in p.relative_to(images).parts)),
                   key=lambda p: p.relative_to(images).as_posix())
    if metas:
        items, captioned, cols_used = [], True, set()
        for meta in metas:
            rows, cols = _read_rows(meta)
            col = _caption_column(meta, cols, caption_column, ("text", "caption"))
            captioned = captioned and col is not None
            cols_used.add(col)
            items += _row_items(rows, meta.parent, meta.parent.relative_to(images).as_posix(), col, len(items))
        where = ", ".join(str(m.relative_to(images)) for m in metas)
        if not captioned:
            print(f"no caption column ('text', 'caption', or --caption-column) in {where}: "
                  "writing image-only samples with the metadata as json")
            for it in items:
                it.caption = None
            return items, False, f"{images} ({where}, no captions)"
        return items, True, f"{images} ({where}, captions: {', '.join(sorted(cols_used))})"
    items = []
    for i, p in enumerate(find_images(images)):
        rel = p.relative_to(images).as_posix()
        items.append(_Item(i, rel, p, extra={"file_name": rel}))
    return items, False, f"{images} (image files, no captions)"


def _write_item(w: ShardWriter, it: _Item, resize: int | None, captioned: bool) -> None:
    if it.skip:
        w.summary.skipped[it.skip] += 1
        return
    if captioned and it.caption is None:
        w.summary.skipped["missing_caption"] += 1
        return
    if not it.path.is_file():
        w.summary.skipped["missing_file"] += 1
        return
    try:
        ext, data = _image_member(it.path, resize)
    except Exception:
        w.summary.skipped["unreadable_image"] += 1
        return
    members: dict = {ext: data}
    if it.caption is not None:
        members["txt"] = it.caption
    if it.extra:
        members["json"] = it.extra
    if it.extra.get("cls") not in (None, ""):
        try:
            members["cls"] = int(it.extra["cls"])
        except (TypeError, ValueError):
            w.summary.skipped["bad_cls"] += 1
            return
    w.write(_key(it.index, it.name), members)


def split_items(items: list[_Item], val_fraction: float | None = None,
                val_items: list[_Item] | None = None) -> dict[str, list[_Item]]:
    """``{"train": ..., "val": ...}``: by a stable hash of each file name (``val_fraction``), or the
    samples of an explicit validation list (captions the list lacks come from ``items``)."""
    if val_items is None:
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"the validation fraction must be between 0 and 1, not {val_fraction}")
        val = [it for it in items if it.name is not None and in_val(it.name, val_fraction)]
        chosen = {id(it) for it in val}
        return {"train": [it for it in items if id(it) not in chosen], "val": val}
    by_file = {it.ident: it for it in items if it.ident is not None}
    for it in val_items:
        if it.caption is None and it.ident in by_file:
            it.caption = by_file[it.ident].caption
            it.extra = {**by_file[it.ident].extra, **it.extra}
    val_files = {it.ident for it in val_items if it.ident is not None}
    return {"train": [it for it in items if it.ident is None or it.ident not in val_files], "val": val_items}


def write_pairs(images: str | Path, captions: str | Path | None = None, out: str | Path = "shards",
                shard_size: int = 10_000, resize: int | None = None, prefix: str = "pairs", *,
                caption_column: str | None = None, val_fraction: float | None = None,
                val_captions: str | Path | None = None) -> WriteSummary | dict[str, WriteSummary]:
    """Image (+ caption) samples from ``images`` into shards in ``out``.

    Captions come from ``captions`` (csv/jsonl with an image column (``image``, ``file_name``,
    ``file``, ``path`` or ``filename``), a caption column (``caption_column``, default ``caption``
    then ``text``), optionally ``cls``; other columns go into ``KEY.json``), else from HF image-folder
    ``metadata.jsonl`` files in ``images`` (``file_name`` + ``text``/``caption``); without either,
    every image file under ``images`` becomes an image-only sample.

    With ``val_fraction`` (a stable hash of the file name decides) or ``val_captions`` (a captions
    file or a plain ``.txt`` list of the validation images) the samples go to ``out/train`` and
    ``out/val`` and a dict of summaries is returned; otherwise to ``out`` and one summary."""
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} not found")
    items, captioned, source = pair_items(images, Path(captions) if captions else None, caption_column)
    print(f"reading {len(items)} samples from {source}")
    if val_fraction is not None or val_captions is not None:
        val_items = None
        if val_captions is not None:
            vpath = Path(val_captions)
            rows, cols = _read_rows(vpath)
            # the named caption column if the list has it; a list without it (e.g. a .txt of file
            # names) takes its captions from the main source
            col = caption_column if caption_column in cols else (
                None if caption_column else _caption_column(vpath, cols, None, ("caption", "text")))
            val_items = _row_items(rows, images, "", col, len(items))
        parts = split_items(items, val_fraction, val_items)
    else:
        parts = {"": items}
    summaries: dict[str, WriteSummary] = {}
    with Staging(out, list(parts)) as st:
        for part, its in parts.items():
            w = ShardWriter(st.path(part), prefix=prefix, max_samples=shard_size)
            for it in progress(its, desc=f"write pairs {part}".strip(), unit="sample"):
                _write_item(w, it, resize, captioned)
            summaries[part] = w.close()
        st.commit()
        for part, s in summaries.items():
            st.published(s, part)
    if "val" in summaries and summaries["val"].samples == 0:
        log.warning("the validation split is empty: raise the validation fraction or list more images")
    return summaries.get("", summaries)


def write_interleaved(docs: str | Path, out: str | Path, shard_size: int = 10_000, resize: int | None = None,
                      prefix: str = "docs") -> WriteSummary:
    """jsonl lines: ``{"segments": [{"text": "..."}, {"image": "path.png"}, ...]}`` or ``{"text": "..."}``.
    Image paths are relative to the jsonl file's folder unless absolute."""
    docs = Path(docs)
    base = docs.parent
    lines = list(enumerate(ln for ln in docs.read_text().splitlines() if ln.strip()))
    with Staging(out, [""]) as st:
        w = ShardWriter(st.path(), prefix=prefix, max_samples=shard_size)
        for i, line in progress(lines, desc="write documents", unit="doc"):
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
        summary = w.close()
        st.commit()
        return st.published(summary)
