"""unifuse's LPIPS against the ``lpips`` package (a test-only oracle, in the dev extra): its
calibrated linear heads ship in its wheel (``lpips/weights/v0.1/vgg.pth``), and both nets get the
same VGG16 backbone, random here, since ImageNet weights would have to be downloaded. Our file is
made by :func:`convert_official` from that backbone's torchvision checkpoint and the package's heads,
so the conversion is checked too. Nothing is downloaded: the test fails if anything tries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unifuse.models.lpips import LPIPS, convert_official

lpips = pytest.importorskip("lpips")
# the package builds its trunk with torchvision's deprecated pretrained= argument
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


@pytest.fixture
def offline(monkeypatch):
    """Any download through torch.hub (torchvision's pretrained weights go through it) fails."""
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"the LPIPS test tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def reference() -> torch.nn.Module:
    """The package's LPIPS-VGG with its shipped heads and a random VGG16 trunk (fixed seed)."""
    torch.manual_seed(0)
    return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


def torchvision_checkpoint(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's trunk as torchvision's VGG16 names it: net.slice<s>.<i>.<p> -> features.<i>.<p>."""
    return {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}


def test_lpips_equals_the_lpips_package_with_the_same_backbone(offline, tmp_path):
    theirs = reference()
    state = torchvision_checkpoint(theirs)
    assert len(state) == 2 * 13  # VGG16's 13 convolutions up to relu5_3, weight and bias each
    torch.save(state, tmp_path / "vgg16.pth")
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    ours = LPIPS.from_file(convert_official(tmp_path / "vgg16.pth", heads, tmp_path / "lpips.pt"))
    g = torch.Generator().manual_seed(1)
    for size in (32, 64):
        a, b = (torch.rand(4, 3, size, size, generator=g) * 2 - 1 for _ in range(2))
        b[0] = a[0]  # an identical pair: distance 0
        b[1] = (a[1] + 0.05 * torch.randn(3, size, size, generator=g)).clamp(-1, 1)  # a near pair
        with torch.no_grad():
            mine, ref = ours(a, b), theirs(a, b).flatten()
        assert ref[0] == 0 and ref[2:].min() > 10 * ref[1] > 0  # the pairs span the range
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0, msg=lambda m: f"{size}x{size}: {m}")
