"""LightningModule for the VQ-VAE tokenizer: reconstruction + quantizer losses, PSNR/SSIM,
codebook usage and perplexity per epoch (all ranks), original-vs-reconstruction grids."""

from __future__ import annotations

import torch

from unifuse.lit.autoencoder import ReconstructionModule


class VQVAEModule(ReconstructionModule):
    def bottleneck(self, x: torch.Tensor):
        recon, idx, qloss = self.net(x)
        return recon, qloss, {"quant": qloss}, None

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
