"""LightningModule for the VQ-VAE tokenizer: reconstruction + quantizer losses, PSNR/SSIM,
codebook usage and perplexity per epoch (all ranks), original-vs-reconstruction grids."""

from __future__ import annotations

import torch

from unifuse.lit.autoencoder import ReconstructionModule
from unifuse.models.vqvae import VQVAE


class VQVAEModule(ReconstructionModule):
    kind = "vqvae"

    def __init__(self, net: VQVAE, optimizer=None, scheduler=None, weight_decay: float = 0.0,
                 recon_loss: str = "l1", num_log_images: int = 16):
        super().__init__(net, optimizer, scheduler, weight_decay, recon_loss, num_log_images)

    def _step(self, batch: dict):
        x = batch["image"]
        recon, idx, qloss = self.net(x)
        return x, recon, idx, self.reconstruction_loss(recon, x), qloss

    def training_step(self, batch: dict, batch_idx: int):
        x, recon, idx, rec, qloss = self._step(batch)
        loss = rec + qloss
        self.log_dict({"train/loss": loss, "train/recon": rec, "train/quant": qloss}, prog_bar=True,
                      batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        x, recon, idx, rec, qloss = self._step(batch)
        self.update_image_metrics(recon, x)
        self.log_dict({"val/loss": rec + qloss, "val/recon": rec}, sync_dist=True, batch_size=x.shape[0],
                      prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        u = self.net.quantizer.usage_stats("eval")
        # already global (all-reduced counts): identical on every rank
        self.log_dict({"val/codebook_usage": u["usage"], "val/codebook_perplexity": u["perplexity"]}, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        u = self.net.quantizer.usage_stats("train")
        self.log_dict({"train/codebook_usage": u["usage"], "train/codebook_perplexity": u["perplexity"]},
                      sync_dist=True)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        counts = self.net.quantizer.eval_counts.clone()
        recon = self.net(x)[0]
        self.net.quantizer.eval_counts.copy_(counts)  # image logging must not count as validation usage
        return recon
