"""Sample grids with their prompts written under each image (the PNGs in the run dir and the CLI's)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def captioned_grid(images: torch.Tensor, captions: list[str], nrow: int, min_tile: int = 96,
                   max_lines: int = 3, pad: int = 4) -> Image.Image:
    """(N, 3, H, W) images in [0, 1] -> one PIL image, ``nrow`` tiles per row, each image scaled up by
    an integer factor (nearest, so pixels stay crisp) to at least ``min_tile`` wide, with its
    caption wrapped underneath in up to ``max_lines`` lines; a caption runs on under the tiles after
    it in the same row whose captions are empty."""
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    n, _, h, w = images.shape
    scale = max(1, math.ceil(min_tile / w))
    tw, th = w * scale, h * scale
    font = ImageFont.load_default()
    line_h = sum(font.getmetrics()) + 1
    char_w = max(1, int(font.getlength("n")))
    lines = []
    for i, c in enumerate(captions):  # a caption may run on under the empty-captioned tiles after it
        span = 1
        while i + span < n and (i + span) % nrow and not captions[i + span]:
            span += 1
        lines.append(textwrap.wrap(c, max(4, (span * (tw + pad) - pad) // char_w))[:max_lines])
    text_h = line_h * max((len(x) for x in lines), default=0)
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    cell_w, cell_h = tw + pad, th + text_h + 2 * pad
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        x, y = pad + (i % nrow) * cell_w, pad + (i // nrow) * cell_h
        canvas.paste(Image.fromarray(pixels[i]).resize((tw, th), Image.NEAREST), (x, y))
        for j, line in enumerate(lines[i]):
            draw.text((x, y + th + pad // 2 + j * line_h), line, fill="black", font=font)
    return canvas


def save_captioned_grid(images: torch.Tensor, captions: list[str], path: str | Path, nrow: int, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    captioned_grid(images, captions, nrow, **kw).save(path)
    return path
