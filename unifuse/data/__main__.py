"""``python -m unifuse.data``: build embedded datasets, write shards, train a BPE vocabulary.

    python -m unifuse.data build emoji [--size 32] [--out data/emoji32]
    python -m unifuse.data build fashion_mnist [--src DIR]
    python -m unifuse.data write pairs --images DIR --captions captions.csv|jsonl --out DIR
    python -m unifuse.data write interleaved --docs docs.jsonl --out DIR
    python -m unifuse.data bpe --shards DIR --out tokenizer.json [--vocab-size 4096]
    python -m unifuse.data encode tokenizer=CKPT src=data/emoji32 out=data/emoji32_codes [batch_size=256]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter


def _texts(spec: str):
    from unifuse.data.samples import DecodeConfig
    from unifuse.data.stream import iter_decoded

    for s in iter_decoded(spec, DecodeConfig(), Counter(), drop_exts=("png", "jpg", "jpeg", "webp")):
        if s.text:
            yield s.text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unifuse.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build an embedded dataset into train/ and val/ shards")
    b.add_argument("name", choices=["emoji", "fashion_mnist"])
    b.add_argument("--out", default=None, help="default: data/<name><size>")
    b.add_argument("--size", type=int, default=None, help="image size (emoji: 32, fashion_mnist: 28)")
    b.add_argument("--src", default=None, help="fashion_mnist: directory with the IDX files")
    b.add_argument("--styles", default="twemoji,openmoji")
    b.add_argument("--no-style-prefix", action="store_true", help="emoji captions without the style")
    b.add_argument("--val-percent", type=float, default=5.0)
    b.add_argument("--force", action="store_true", help="rebuild even if shards exist")

    w = sub.add_parser("write", help="write shards from your own files")
    w.add_argument("kind", choices=["pairs", "interleaved"])
    w.add_argument("--images", help="pairs: image folder")
    w.add_argument("--captions", help="pairs: csv or jsonl with image, caption[, cls]")
    w.add_argument("--docs", help="interleaved: jsonl of documents")
    w.add_argument("--out", required=True)
    w.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    w.add_argument("--resize", type=int, default=None, help="resize + center-crop to N (PNG)")

    t = sub.add_parser("bpe", help="train a byte-level BPE tokenizer on the shards' text")
    t.add_argument("--shards", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)

    e = sub.add_parser("encode", help="pre-encode image shards into VQ code shards (.npy)")
    e.add_argument("--tokenizer", required=True, help="VQ-VAE checkpoint")
    e.add_argument("--src", required=True, help="image shards (a dir with train/ and val/, or one dir)")
    e.add_argument("--out", required=True)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--shard-size", type=int, default=10_000)
    e.add_argument("--device", default="cpu")
    e.add_argument("--image-size", type=int, default=None, help="resize images first (default: as stored)")

    # key=value arguments (tokenizer=ckpt) are accepted as --key value
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [x for a_ in argv for x in (("--" + a_.split("=", 1)[0].replace("_", "-"), a_.split("=", 1)[1])
            if "=" in a_ and not a_.startswith("-") else (a_,))]
    a = p.parse_args(argv)
    if a.cmd == "build":
        from pathlib import Path

        from unifuse.data import builders

        size = a.size or (32 if a.name == "emoji" else 28)
        out = Path(a.out or f"data/{a.name}{size}")
        if (out / "train").is_dir() and any((out / "train").glob("*.tar")) and not a.force:
            print(f"{out} exists; use --force to rebuild")
            return 0
        if a.name == "emoji":
            builders.build_emoji(out, size=size, styles=tuple(a.styles.split(",")), val_percent=a.val_percent,
                                 style_prefix=not a.no_style_prefix)
        else:
            builders.build_fashion_mnist(out, src=a.src, size=size)
        print(f"shards in {out}/train and {out}/val")
    elif a.cmd == "write":
        from unifuse.data.write import write_interleaved, write_pairs

        if a.kind == "pairs":
            if not (a.images and a.captions):
                p.error("write pairs needs --images and --captions")
            summary = write_pairs(a.images, a.captions, a.out, a.shard_size, a.resize)
        else:
            if not a.docs:
                p.error("write interleaved needs --docs")
            summary = write_interleaved(a.docs, a.out, a.shard_size, a.resize)
        print(summary)
    elif a.cmd == "encode":
        from unifuse.data.encode import encode_shards

        encode_shards(a.tokenizer, a.src, a.out, batch_size=a.batch_size, shard_size=a.shard_size,
                      device=a.device, image_size=a.image_size)
    elif a.cmd == "bpe":
        from unifuse.text.tokenizer import BPETokenizer

        tok = BPETokenizer.train(_texts(a.shards), a.out, a.vocab_size)
        print(f"BPE tokenizer with {tok.vocab_size} tokens written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
