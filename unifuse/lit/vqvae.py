"""LightningModule for the VQ-VAE tokenizer: reconstruction + quantizer losses, PSNR/SSIM,
codebook usage and perplexity per epoch (all ranks), original-vs-reconstruction grids."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from unifuse.lit.base import UnifuseModule
from unifuse.models.vqvae import VQVAE


class VQVAEModule(UnifuseModule):
    kind = "vqvae"

    def __init__(self, net: VQVAE, optimizer=None, scheduler=None, weight_decay: float = 0.0,
                 recon_loss: str = "l1", num_log_images: int = 16):
        super().__init__(optimizer, scheduler, weight_decay)
        if recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', not {recon_loss!r}")
        self.net, self.recon_loss, self.num_log_images = net, recon_loss, num_log_images
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

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

    def checkpoint_meta(self) -> dict:
        return {"kind": self.kind, "config": self.net.config()}

    def _step(self, batch: dict):
        x = batch["image"]
        recon, idx, qloss = self.net(x)
        rec = F.l1_loss(recon, x) if self.recon_loss == "l1" else F.mse_loss(recon, x)
        return x, recon, idx, rec, qloss

    def training_step(self, batch: dict, batch_idx: int):
        x, recon, idx, rec, qloss = self._step(batch)
        loss = rec + qloss
        self.log_dict({"train/loss": loss, "train/recon": rec, "train/quant": qloss}, prog_bar=True,
                      batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        x, recon, idx, rec, qloss = self._step(batch)
        a, b = (recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2
        self.psnr.update(a, b)
        self.ssim.update(a, b)
        self.log_dict({"val/loss": rec + qloss, "val/recon": rec}, sync_dist=True, batch_size=x.shape[0],
                      prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/psnr": self.psnr.compute(), "val/ssim": self.ssim.compute()})  # torchmetrics syncs
        self.psnr.reset()
        self.ssim.reset()
        u = self.net.quantizer.usage_stats("eval")
        # already global (all-reduced counts): identical on every rank
        self.log_dict({"val/codebook_usage": u["usage"], "val/codebook_perplexity": u["perplexity"]}, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        u = self.net.quantizer.usage_stats("train")
        self.log_dict({"train/codebook_usage": u["usage"], "train/codebook_perplexity": u["perplexity"]},
                      sync_dist=True)

    @torch.no_grad()
    def log_images(self, batch: dict) -> dict:
        x = batch["image"][: self.num_log_images]
        counts = self.net.quantizer.eval_counts.clone()
        recon = self.net(x)[0].clamp(-1, 1)
        self.net.quantizer.eval_counts.copy_(counts)  # image logging must not count as validation usage
        caps = batch.get("caption")
        caps = list(caps[: len(x)]) if caps is not None else None
        # originals in the first row(s), reconstructions below, same order
        return {"reconstructions": (torch.cat([x, recon]), caps + caps if caps else None)}
