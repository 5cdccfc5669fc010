"""LightningModule for the KL autoencoder: reconstruction + KL, PSNR/SSIM, and the latent
statistics (shift and scale) measured from the training images and kept in the weights.

The statistics are those of the posterior means of the most recent ``latent_stats_images``
training images (summed over all ranks), refreshed every step, so whenever a checkpoint is written
(end of training included) it holds the values of the weights it stores, up to the last few
thousand images' drift."""

from __future__ import annotations

from collections import deque

import torch

from unifuse.lit.autoencoder import ReconstructionModule
from unifuse.models.kl_autoencoder import KLAutoencoder


class KLAutoencoderModule(ReconstructionModule):
    def __init__(self, net: KLAutoencoder, *args, kl_weight: float = 1e-6, latent_stats_images: int = 4096,
                 **kwargs):
        super().__init__(net, *args, **kwargs)
        self.kl_weight, self.latent_stats_images = float(kl_weight), int(latent_stats_images)
        self._window: deque[torch.Tensor] = deque()

    def bottleneck(self, x: torch.Tensor):
        recon, kl, q = self.net(x)
        # KL summed over the latent and divided by the pixel count: the ratio of latent-diffusion's
        # sum-reduced losses, with the reconstruction averaged per pixel
        kl = kl.mean() / x[0].numel()
        logs = {"kl": kl}
        if not self.training:
            z = self.net.normalise(q.mean) if self.net.has_latent_stats else q.mean
            logs.update(latent_std=z.std(), latent_mean=z.mean())
        return recon, self.kl_weight * kl, logs, q.mean.detach()

    def after_train_step(self, mean: torch.Tensor) -> None:
        self._track_latents(mean)

    def checkpoint_extras(self) -> dict:
        # the window behind the statistics, so a resumed run goes on refreshing them as the interrupted one would
        window = torch.stack(list(self._window)) if self._window else torch.zeros(0, 4, dtype=torch.float64)
        return {**super().checkpoint_extras(), "kl_latent_window": window}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kl_latent_window" in checkpoint:
            self._window = deque(checkpoint["kl_latent_window"].unbind(0))

    @torch.no_grad()
    def _track_latents(self, mean: torch.Tensor) -> None:
        m = mean.double()
        sums = torch.stack([torch.tensor(float(m.numel()), dtype=torch.float64, device=m.device), m.sum(),
                            m.pow(2).sum(), torch.tensor(float(len(m)), dtype=torch.float64, device=m.device)])
        if self.trainer is not None and self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self._window.append(sums.cpu())
        while len(self._window) > 1 and sum(float(w[3]) for w in self._window) - float(self._window[0][3]) \
                >= self.latent_stats_images:
            self._window.popleft()
        count, s, s2, n = torch.stack(list(self._window)).sum(0).tolist()
        self.net.set_latent_stats(count, s, s2, int(n))
