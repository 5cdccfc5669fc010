"""LightningModule for latent diffusion: a DiT denoiser over the normalised latents of a frozen KL
autoencoder (:class:`~unifuse.lit.latent.LatentGeneratorModule`), text or class conditioned with
caption dropout for guidance. The transport (DDPM or
flow matching), target and loss weighting are the net's ``diffusion`` config; the loss math is
:mod:`unifuse.diffusion`'s. EMA weights come from ``callbacks.ema`` (:mod:`unifuse.run.ema`), as for
every module."""

from __future__ import annotations

import torch

from unifuse.lit.latent import LatentGeneratorModule
from unifuse.models.dit import DiT


class LatentDiffusionModule(LatentGeneratorModule):
    def __init__(self, net: DiT, *args, weight_decay: float = 0.0, **kwargs):
        super().__init__(net, *args, weight_decay=weight_decay, **kwargs)

    def _loss(self, batch: dict, drop: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion loss; with ``generator`` (validation) at fixed times and noise of the posterior mean."""
        z = self.latents(batch, sample=generator is None)
        cond = self.net.encode_conditions(self._conds(batch, drop), z.device)
        t = eps = None
        if generator is not None:  # validation: the same times and noise every epoch
            t = self.net.diffusion.sample_t(len(z), "cpu", generator).to(z.device)
            eps = torch.randn(z.shape, generator=generator).to(z.device)
        return self.net.diffusion.loss(lambda x, tt: self.net(x, tt, cond), z, t, eps).mean()

    def _batch_size(self, batch: dict) -> int:
        return len(batch["latents"] if "latents" in batch else batch["image"])

    def training_step(self, batch: dict, batch_idx: int):
        loss = self._loss(batch, self.p_uncond)
        if self.finite_losses({"diffusion": loss}, batch):  # skipped: the guard drops the gradients
            self.log("train/loss", loss, prog_bar=True, batch_size=self._batch_size(batch))
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        g = torch.Generator().manual_seed(1000 + batch_idx)
        self.log("val/loss", self._loss(batch, 0.0, g), sync_dist=True, batch_size=self._batch_size(batch))

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of the batch: 3x the denoiser's forward (the backward costs two), its
        caption encoder included, over every caption position of the batch (captions are padded to
        the longest; caption dropout, which shortens some, is not counted). The frozen autoencoder
        is not counted."""
        conds = batch["caption"] if self.cond == "text" else batch["cls"].tolist()
        text = self.net.encode_conditions(conds, "cpu").get("text_tokens")
        return 3.0 * self._batch_size(batch) * self.net.flops_per_sample(0 if text is None else text.shape[1])
