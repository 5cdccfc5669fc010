"""LightningModules of the autoencoders (VQ-VAE tokenizer, KL autoencoder): what both share
(reconstruction loss, PSNR/SSIM, FLOPs, original-vs-reconstruction grids) lives in
:class:`ReconstructionModule`; each subclass adds its bottleneck's loss and statistics."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from unifuse.lit.base import UnifuseModule


class ReconstructionModule(UnifuseModule):
    def __init__(self, net, optimizer=None, scheduler=None, weight_decay: float = 0.0, recon_loss: str = "l1",
                 num_log_images: int = 16):
        super().__init__(optimizer, scheduler, weight_decay)
        if recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', not {recon_loss!r}")
        self.net, self.recon_loss, self.num_log_images = net, recon_loss, num_log_images
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def checkpoint_meta(self) -> dict:
        return {"kind": self.kind, "config": self.net.config()}

    def reconstruction_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(recon, x) if self.recon_loss == "l1" else F.mse_loss(recon, x)

    @torch.no_grad()
    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of one batch: the forward counted by torch's FlopCounterMode, x3."""
        from torch.utils.flop_counter import FlopCounterMode

        x = batch["image"]
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
        counter = FlopCounterMode(display=False)
        with counter:
            self.net(x[:1])
        return 3.0 * counter.get_total_flops() * len(x)

    def update_image_metrics(self, recon: torch.Tensor, x: torch.Tensor) -> None:
        a, b = (recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2
        self.psnr.update(a, b)
        self.ssim.update(a, b)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/psnr": self.psnr.compute(), "val/ssim": self.ssim.compute()})  # torchmetrics syncs
        self.psnr.reset()
        self.ssim.reset()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]

    @torch.no_grad()
    def log_images(self, batch: dict) -> dict:
        x = batch["image"][: self.num_log_images]
        recon = self.reconstruct(x).clamp(-1, 1)
        caps = batch.get("caption")
        caps = list(caps[: len(x)]) if caps is not None else None
        # originals in the first row(s), reconstructions below, same order
        return {"reconstructions": (torch.cat([x, recon]), caps + caps if caps else None)}
