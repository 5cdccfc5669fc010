"""LightningModule for latent diffusion: a DiT denoiser over the normalised latents of a frozen KL
autoencoder (encoded on the fly from image batches; in training the posterior is sampled, as the
autoencoder was trained; validation takes its mean, so its loss moves only with the weights), text or
class conditioned with caption dropout for guidance. The transport (DDPM or
flow matching), target and loss weighting are the net's ``diffusion`` config; the loss math is
:mod:`unifuse.diffusion`'s. EMA weights come from ``callbacks.ema`` (:mod:`unifuse.run.ema`), as for
every module."""

from __future__ import annotations

import torch

from unifuse.lit.generators import GeneratorModule
from unifuse.models.dit import DiT
from unifuse.models.kl_autoencoder import KLAutoencoder
from unifuse.pipelines import LatentDiffusionPipeline


class LatentDiffusionModule(GeneratorModule):
    kind = "ldm"
    tokenizer_kind = "kl_autoencoder"
    pipeline_class = LatentDiffusionPipeline

    def __init__(self, net: DiT, *args, weight_decay: float = 0.0, **kwargs):
        super().__init__(net, *args, weight_decay=weight_decay, **kwargs)

    def check_tokenizer(self, tok: KLAutoencoder) -> None:
        if not tok.has_latent_stats:
            raise ValueError(f"{self.tokenizer_ckpt}: the autoencoder has no measured latent statistics; "
                             "train it with model=kl_autoencoder (model.tokenizer_ckpt names it)")
        if tok.latent_channels != self.net.latent_shape()[0]:
            raise ValueError(f"model.tokenizer_ckpt={self.tokenizer_ckpt} has {tok.latent_channels} latent channels "
                             f"but {self.net.config_key}.latent_channels is {self.net.latent_shape()[0]}")

    def latents(self, batch: dict, sample: bool = True) -> torch.Tensor:
        """Normalised latents of a batch: from latent shards (posterior mean and std) or encoded from
        images by the frozen autoencoder. ``sample``: a posterior sample (training, drawn from the
        global generator); else the posterior mean (validation: the same latent every epoch, and no
        draw from the generator that training uses)."""
        if self.tokenizer is None:
            raise ValueError("latent diffusion needs its autoencoder: set model.tokenizer_ckpt")
        if "latents" in batch:
            stored = batch["latents"]
            c, want = stored.shape[1] // 2, self.net.latent_shape()
            if stored.shape[1] != 2 * want[0] or tuple(stored.shape[2:]) != want[1:]:
                raise ValueError(f"latent shards hold {tuple(stored.shape[1:])} (mean and std stacked), but the "
                                 f"denoiser takes {want}: re-encode them with model.tokenizer_ckpt, or set "
                                 f"{self.net.config_key}.latent_channels / latent_size to match")
            mean, std = stored[:, :c].float(), stored[:, c:].float()
            return self.tokenizer.normalise(mean + std * torch.randn_like(std) if sample else mean)
        x = batch["image"]
        self.tokenizer.to(x.device)
        with torch.no_grad():
            q = self.tokenizer.posterior(x)
            z = self.tokenizer.normalise(q.sample() if sample else q.mean)
        if tuple(z.shape[1:]) != self.net.latent_shape():
            raise ValueError(f"images of {tuple(x.shape[-2:])} give latents {tuple(z.shape[1:])}, but the denoiser "
                             f"takes {self.net.latent_shape()}: set {self.net.config_key}.latent_size to "
                             f"data.decode.image_size / {self.tokenizer.downsample_factor}")
        return z

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
