"""LPIPS (Zhang et al. 2018, VGG variant) as an optional perceptual reconstruction loss, loaded only
from a local weights file: nothing is downloaded.

The file is one state dict (``torch.save``, read with ``weights_only=True``) holding torchvision's
VGG16 ``features.*`` and the five linear heads ``lins.{0..4}.weight`` (1x1 convs over the
channel-normalised feature differences). :func:`convert_official` builds it from torchvision's
``vgg16-397923af.pth`` and the ``lpips`` package's ``weights/v0.1/vgg.pth``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16's features
WIDTHS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # VGG16's convolutional trunk alone (torchvision's ``vgg16().features``, same module indices),
        # without building the 120M-parameter classifier that would be dropped; weights come from the file
        self.features = make_layers(cfgs["D"])[: TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in WIDTHS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path | None, setting: str = "model.lpips_weights") -> LPIPS:
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"LPIPS weights not found: {setting}={path}. unifuse never downloads weights: build the file once "
                "with unifuse.models.lpips.convert_official(<torchvision vgg16-397923af.pth>, <lpips "
                "weights/v0.1/vgg.pth>, <out.pt>) and point the setting at it, or set the perceptual weight to 0")
        net = cls()
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing or unexpected:
            raise ValueError(f"{setting}={path} is not an LPIPS weights file (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between images in [-1, 1]."""
        x = torch.cat([a, b]).float()
        h = (x - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device)
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == TAPS[tap]:
                fa, fb = h.chunk(2)
                fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((fa - fb) ** 2).mean((1, 2, 3))
                tap += 1
        return total


def convert_official(vgg_path: str | Path, lpips_path: str | Path, out: str | Path) -> Path:
    """One LPIPS weights file from torchvision's VGG16 checkpoint and the lpips package's linear
    heads (``lin{i}.model.1.weight``)."""
    vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
    lin = torch.load(lpips_path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in vgg.items() if k.startswith("features.")}
    state.update({f"lins.{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(len(WIDTHS))})
    torch.save(state, out)
    return Path(out)
