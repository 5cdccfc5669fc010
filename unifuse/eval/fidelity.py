"""FID / KID / IS through torch-fidelity, with the protocol carried in every result.

One code path serves the online callback (during validation) and the offline CLI
(``python -m unifuse.evaluate``), so the same checkpoint, protocol and seed give the same number.

Protocol (part of every result and of the metric names): n generated/reconstructed images,
reference set (first n images of the named split, in shard order), resolution, feature extractor
(+ weights hash), sampler, steps, guidance scale, EMA or raw weights, seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset

from unifuse.data.read import iter_decoded
from unifuse.data.samples import DecodeConfig, image_batch
from unifuse.eval.extractors import DOMAIN, INCEPTION, file_hash, inception_weights
from unifuse.eval.protocol import EvalConfig  # noqa: F401  (the settings' home; re-exported)
from unifuse.run.progress import interactive, progress
from unifuse.sampling import eval_mode

log = logging.getLogger("unifuse.eval")


class _Images(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounded the same way everywhere."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def reference_set(shards: str, n: int, size: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """First n decodable images of a split (shard order: deterministic) and their captions."""
    images, captions = [], []
    for s in iter_decoded(shards, DecodeConfig(image_size=size, require_image=True), Counter()):
        images.append(s.images[0])
        captions.append(s.text or "")
        if len(images) >= n:
            break
    if not images:
        raise ValueError(f"no reference images in {shards}")
    return image_batch(images), captions


def extractor_setup(cfg: EvalConfig) -> tuple[str, str, str]:
    """(torch-fidelity extractor name, weights path, protocol id). Fails fast on missing weights."""
    if cfg.extractor == "domain":
        if not cfg.domain_weights or not Path(cfg.domain_weights).is_file():
            raise FileNotFoundError(
                f"domain extractor weights not found: eval.domain_weights={cfg.domain_weights} (build them with "
                "`python -m unifuse.evaluate build-extractor shards=<labelled train shards> out=<file.pt>`, "
                "or use extractor=inception with inception_weights=<file>)")
        return DOMAIN, cfg.domain_weights, f"domain-{file_hash(cfg.domain_weights)}"
    if cfg.extractor == "inception":
        path = inception_weights(cfg.inception_weights)
        return INCEPTION, path, "inception-v3-compat"
    raise ValueError(f"eval.extractor must be 'domain' or 'inception', not {cfg.extractor!r}")


def fidelity(images: torch.Tensor, reference: torch.Tensor, cfg: EvalConfig, cache_key: str | None = None) -> dict:
    """FID/KID(/IS) of uint8 images against uint8 reference images."""
    name, weights, _ = extractor_setup(cfg)
    n = min(len(images), len(reference))
    kw = dict(input1=_Images(images), input2=_Images(reference), cuda=torch.cuda.is_available(),
              batch_size=cfg.batch_size, fid="fid" in cfg.metrics, kid="kid" in cfg.metrics,
              isc="isc" in cfg.metrics, feature_extractor=name, feature_extractor_weights_path=weights,
              kid_subset_size=min(1000, n), kid_subsets=100, verbose=interactive(), samples_shuffle=False,
              rng_seed=cfg.seed, cache=bool(cache_key and cfg.cache_dir),
              save_cpu_ram=True)  # in-memory tensors: no loader workers needed
    if kw["cache"]:
        kw.update(cache_root=cfg.cache_dir, input2_cache_name=cache_key)
    t = time.perf_counter()
    log.info("features of %d + %d images with %s (%s)...", len(images), len(reference), name, ", ".join(cfg.metrics))
    m = torch_fidelity.calculate_metrics(**kw)
    log.info("features and metrics in %.1fs", time.perf_counter() - t)
    out = {}
    if "fid" in cfg.metrics:
        out["fid"] = float(m["frechet_inception_distance"])
    if "kid" in cfg.metrics:
        out["kid"] = float(m["kernel_inception_distance_mean"])
        out["kid_std"] = float(m["kernel_inception_distance_std"])
    if "isc" in cfg.metrics:
        out["isc"] = float(m["inception_score_mean"])
    return out


def _protocol(cfg: EvalConfig, n: int, reference: torch.Tensor, **extra) -> dict:
    return {"n": n, "reference": cfg.reference_name, "resolution": int(reference.shape[-1]),
            "feature_extractor": extractor_setup(cfg)[2], "seed": cfg.seed, **extra}


def _cache_key(protocol: dict) -> str:
    return f"{protocol['reference']}-r{protocol['resolution']}-n{protocol['n']}-{protocol['feature_extractor']}"


def protocol_parts(protocol: dict) -> list[str]:
    """What names a result: extractor, n, EMA weights, and for generators the diffusion sampler,
    guidance (``lin``: linear ramp) and steps."""
    parts = [protocol["feature_extractor"], f"n{protocol['n']}"]
    if protocol.get("weights") == "ema":
        parts.append("ema")
    if protocol.get("diffusion_sampler"):
        parts.append(protocol["diffusion_sampler"])
    if protocol.get("cfg_scale") is not None:
        ramp = "lin" if protocol.get("cfg_schedule", "constant") == "linear" else ""
        parts.append(f"cfg{protocol['cfg_scale']}{ramp}")
    if protocol.get("steps"):
        parts.append(f"steps{protocol['steps']}")
    return parts


def metric_name(metric: str, protocol: dict) -> str:
    """e.g. ``eval/rfid@domain-1a2b3c-n256`` or ``eval/fid@inception-v3-compat-n10000-cfg3.0-steps8``."""
    return f"eval/{metric}@{'-'.join(protocol_parts(protocol))}"


@torch.no_grad()
def evaluate_tokenizer(net, cfg: EvalConfig, weights: str = "raw") -> dict:
    """Reconstruction FID (rFID) + PSNR/SSIM of an autoencoder over the first n reference images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    ref, _ = reference_set(cfg.reference, cfg.n)
    dev = next(net.parameters()).device
    recon = []
    batches = range(0, len(ref), cfg.batch_size)
    with eval_mode(net):
        for i in progress(batches, total=len(batches), desc=f"reconstruct {len(ref)} images", unit="batch"):
            x = ref[i : i + cfg.batch_size].to(dev).float() / 127.5 - 1
            recon.append(to_uint8(net(x)[0]))
    recon = torch.cat(recon)
    protocol = _protocol(cfg, len(ref), ref, task="reconstruction", weights=weights)
    m = fidelity(recon, ref, cfg, _cache_key(protocol))
    a, b = recon.float() / 255, ref.float() / 255
    m["rfid"] = m.pop("fid", math.nan)
    m["psnr"] = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    m["ssim"] = float(structural_similarity_index_measure(a, b, data_range=1.0))
    return {"metrics": m, "protocol": protocol}


@torch.no_grad()
def evaluate_generator(pipeline, cfg: EvalConfig, weights: str = "raw", **overrides) -> dict:
    """FID/KID of images generated from the reference set's own captions (paired prompts).

    ``pipeline``: prompts -> images (``unifuse.pipelines``), with its stored sampling settings;
    ``overrides`` replace some of them. Image i is drawn with seed ``cfg.seed + i`` (per-row
    generators), so the result does not depend on the batch size."""
    ref, captions = reference_set(cfg.reference, cfg.n)
    # what the generator takes of the settings; image i gets its own seed
    sampling = pipeline.arguments(pipeline.settings(**{k: v for k, v in overrides.items() if k != "seed"}))
    sampling.pop("seed", None)
    images = []
    batches = range(0, len(captions), cfg.batch_size)
    for i in progress(batches, total=len(batches), desc=f"generate {len(captions)} images", unit="batch"):
        prompts = captions[i : i + cfg.batch_size]
        images.append(to_uint8(pipeline.generate(prompts, seed=cfg.seed + i, **sampling)))
    images = torch.cat(images)
    protocol = _protocol(cfg, len(ref), ref, task="text-to-image", weights=weights, sampler=pipeline.kind,
                         diffusion_sampler=sampling.get("sampler"), eta=sampling.get("eta"),
                         cfg_scale=sampling.get("cfg_scale"), cfg_schedule=sampling.get("cfg_schedule", "constant"),
                         steps=sampling.get("steps"),
                         temperature=sampling.get("temperature", 1.0), top_k=sampling.get("top_k"),
                         top_p=sampling.get("top_p"))
    return {"metrics": fidelity(images, ref, cfg, _cache_key(protocol)), "protocol": protocol}


def config_dict(cfg: EvalConfig) -> dict:
    return asdict(cfg)
