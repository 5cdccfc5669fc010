"""``python -m unifuse.export ckpt=<checkpoint> out=<dir>``: weights for people who share them the
way the Hugging Face ecosystem does.

Writes ``model.safetensors`` (the net's weights), ``config.json`` (kind, architecture, sampling
settings, evaluation protocol, the text tokenizer's vocabulary, the image tokenizer's description)
and, for generators, ``tokenizer.safetensors`` (the image tokenizer's weights). Loading needs
neither Lightning nor pickle::

    import json, safetensors.torch
    from unifuse.run.checkpoint import build_net
    c = json.load(open("dir/config.json"))
    net = build_net(c["kind"], c["config"], safetensors.torch.load_file("dir/model.safetensors"))

The directory is itself a checkpoint for ``unifuse.sample`` and ``unifuse.evaluate`` (``ckpt=dir``).
A paradigm defined outside unifuse needs its module: ``plugins=[<module>]``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from unifuse import config as _config
from unifuse.run.checkpoint import export as write_export


def export(cfg: DictConfig):
    out = write_export(cfg.ckpt, cfg.out)
    print(f"exported {cfg.ckpt} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return out


main = _config.tool_main("export", export)

if __name__ == "__main__":
    main()
