"""Small helpers shared by the key=value command lines (``unifuse.sample``, ``unifuse.evaluate``)."""

from __future__ import annotations


def parse_kv(argv: list[str], usage: str) -> dict[str, str]:
    """``["ckpt=a.ckpt", "n=8"]`` -> ``{"ckpt": "a.ckpt", "n": "8"}``; anything else exits with the usage."""
    out = {}
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"expected key=value, got {a!r}\n\n{usage}")
        k, v = a.split("=", 1)
        out[k.lstrip("-").replace("-", "_")] = v
    return out
