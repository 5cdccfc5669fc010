"""``python -m unifuse.data``: build embedded datasets, write shards, train a BPE vocabulary.

    python -m unifuse.data build emoji [--size 32] [--out data/emoji32]
    python -m unifuse.data build fashion_mnist [--src DIR]
    python -m unifuse.data write pairs --images DIR [--captions captions.csv|jsonl] --out DIR [--val-fraction 0.05]
    python -m unifuse.data write interleaved --docs docs.jsonl --out DIR
    python -m unifuse.data bpe --shards DIR --out tokenizer.json [--vocab-size 4096]
    python -m unifuse.data encode tokenizer=CKPT src=data/emoji32 out=data/emoji32_codes [batch_size=256]

Options may also be given as key=value (``batch_size=256`` is ``--batch-size 256``); unknown ones
are an error.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from unifuse.data import builders
from unifuse.data.encode import encode_shards
from unifuse.data.read import iter_texts
from unifuse.data.shards import build_complete
from unifuse.data.write import write_interleaved, write_pairs
from unifuse.text.tokenizer import BPETokenizer

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="python -m unifuse.data", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build an embedded dataset into train/ and val/ shards", allow_abbrev=False)
    b.add_argument("name", choices=["emoji", "fashion_mnist"])
    b.add_argument("--out", default=None, help="default: data/<name><size>")
    b.add_argument("--size", type=int, default=None, help="image size (emoji: 32, fashion_mnist: 28)")
    b.add_argument("--src", default=None, help="fashion_mnist: directory with the IDX files")
    b.add_argument("--styles", default="twemoji,openmoji")
    b.add_argument("--no-style-prefix", action="store_true", help="emoji captions without the style")
    b.add_argument("--val-percent", type=float, default=5.0)
    b.add_argument("--limit", type=int, default=None, help="emoji: at most this many images per style")
    b.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    b.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")

    w = sub.add_parser("write", help="write shards from your own files", allow_abbrev=False)
    w.add_argument("kind", choices=["pairs", "interleaved"])
    w.add_argument("--images", help="pairs: image folder")
    w.add_argument("--captions", help="pairs: csv or jsonl with image, caption[, cls]; default: the folder's "
                                      "metadata.jsonl (Hugging Face image folder), else image-only samples")
    w.add_argument("--caption-column", default=None,
                   help="pairs: the caption column (default: caption, then text; metadata.jsonl: text, then caption)")
    split = w.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=None,
                       help="pairs: write OUT/train and OUT/val, this fraction in val (a stable hash of the file name)")
    split.add_argument("--val-captions", default=None,
                       help="pairs: write OUT/train and OUT/val, val = the images in this file (csv/jsonl like "
                            "--captions, or .txt with one file name a line)")
    w.add_argument("--docs", help="interleaved: jsonl of documents")
    w.add_argument("--out", required=True)
    w.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    w.add_argument("--resize", type=int, default=None, help="resize + center-crop to N (PNG)")

    t = sub.add_parser("bpe", help="train a byte-level BPE tokenizer on the shards' text", allow_abbrev=False)
    t.add_argument("--shards", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)

    e = sub.add_parser("encode", help="pre-encode image shards into VQ code or KL latent shards (.npy)",
                       allow_abbrev=False)
    e.add_argument("--tokenizer", required=True, help="VQ-VAE or KL autoencoder checkpoint")
    e.add_argument("--src", required=True, help="image shards (a dir with train/ and val/, or one dir)")
    e.add_argument("--out", required=True)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--shard-size", type=int, default=10_000)
    e.add_argument("--device", default="cpu")
    e.add_argument("--image-size", type=int, default=None, help="resize images first (default: as stored)")
    return p, dict(sub.choices)


def _key_values(argv: list[str], parsers: list[argparse.ArgumentParser]) -> tuple[list[str], dict[str, str]]:
    """``key=value`` -> ``--key value`` where an option may stand (not as the value of an option:
    ``--out run=1`` stays). Returns the new argv and, for error messages, what each ``--key`` was."""
    flags = {s for sp in parsers for a in sp._actions if a.nargs == 0 for s in a.option_strings}
    out, orig, prev = [], {}, None
    for tok in argv:
        key, eq, value = tok.partition("=")
        takes_value = prev is not None and prev.startswith("-") and "=" not in prev and prev not in flags
        if eq and not tok.startswith("-") and _KEY.fullmatch(key) and not takes_value:
            opt = "--" + key.replace("_", "-")
            out += [opt, value]
            orig[opt] = tok
            orig[value] = tok
        else:
            out.append(tok)
        prev = tok
    return out, orig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, subs = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, orig = _key_values(argv, [p, *subs.values()])
    a, unknown = p.parse_known_args(argv)
    if unknown:
        shown = list(dict.fromkeys(orig.get(u, u) for u in unknown))
        subs[a.cmd].error(f"unrecognized arguments: {' '.join(shown)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cmd == "build":
        size = a.size or (32 if a.name == "emoji" else 28)
        out = Path(a.out or f"data/{a.name}{size}")
        if build_complete(out) and not a.force:
            print(f"{out} exists; use --force to rebuild")
            return 0
        if out.exists() and not a.force:
            print(f"{out} holds an incomplete build (interrupted?): building it again")
        extra = {"shard_size": a.shard_size} if a.shard_size else {}
        if a.name == "emoji":
            builders.build_emoji(out, size=size, styles=tuple(a.styles.split(",")), val_percent=a.val_percent,
                                 style_prefix=not a.no_style_prefix, limit=a.limit, **extra)
        else:
            builders.build_fashion_mnist(out, src=a.src, size=size, **extra)
        print(f"shards in {out}/train and {out}/val")
    elif a.cmd == "write":
        sub = _parser()[1]["write"]
        if a.kind == "pairs":
            if not a.images:
                sub.error("write pairs needs --images")
            if a.val_fraction is not None and not 0.0 < a.val_fraction < 1.0:
                sub.error(f"--val-fraction must be between 0 and 1, not {a.val_fraction}")
            summary = write_pairs(a.images, a.captions, a.out, a.shard_size, a.resize, caption_column=a.caption_column,
                                  val_fraction=a.val_fraction, val_captions=a.val_captions)
        else:
            if not a.docs:
                sub.error("write interleaved needs --docs")
            for opt, v in (("--captions", a.captions), ("--caption-column", a.caption_column),
                           ("--val-fraction", a.val_fraction), ("--val-captions", a.val_captions)):
                if v is not None:
                    sub.error(f"{opt} is for write pairs")
            summary = write_interleaved(a.docs, a.out, a.shard_size, a.resize)
        if isinstance(summary, dict):
            for split, s in summary.items():
                print(f"{split} ({a.out}/{split}): {s}")
        else:
            print(f"{a.out}: {summary}")
    elif a.cmd == "encode":
        encode_shards(a.tokenizer, a.src, a.out, batch_size=a.batch_size, shard_size=a.shard_size,
                      device=a.device, image_size=a.image_size)
    elif a.cmd == "bpe":
        tok = BPETokenizer.train(iter_texts(a.shards), a.out, a.vocab_size)
        print(f"BPE tokenizer with {tok.vocab_size} tokens written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
