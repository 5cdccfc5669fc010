"""What the generators over the latents of a frozen KL autoencoder share (latent diffusion and
Transfusion): the check of the autoencoder against the net, and the normalised latents of a batch,
from latent shards or encoded on the fly (in training the posterior is sampled, as the autoencoder
was trained; validation takes its mean, so its loss moves only with the weights). The identity pixel
space (``model.tokenizer_ckpt=identity``) stands in for the autoencoder unchanged."""

from __future__ import annotations

import torch

from unifuse.lit.generators import GeneratorModule
from unifuse.models.kl_autoencoder import KLAutoencoder


class LatentGeneratorModule(GeneratorModule):
    """A generator whose net takes latents of ``net.latent_shape()`` (and names its settings'
    section ``net.config_key``)."""

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
            raise ValueError(f"a {self.kind} model needs its autoencoder: set model.tokenizer_ckpt")
        if "latents" in batch:
            stored = batch["latents"]
            c, want = stored.shape[1] // 2, self.net.latent_shape()
            if stored.shape[1] != 2 * want[0] or tuple(stored.shape[2:]) != want[1:]:
                raise ValueError(f"latent shards hold {tuple(stored.shape[1:])} (mean and std stacked), but the "
                                 f"net takes {want}: re-encode them with model.tokenizer_ckpt, or set "
                                 f"{self.net.config_key}.latent_channels / latent_size to match")
            mean, std = stored[:, :c].float(), stored[:, c:].float()
            return self.tokenizer.normalise(mean + std * torch.randn_like(std) if sample else mean)
        x = batch["image"]
        self.tokenizer.to(x.device)
        with torch.no_grad():
            q = self.tokenizer.posterior(x)
            z = self.tokenizer.normalise(q.sample() if sample else q.mean)
        if tuple(z.shape[1:]) != self.net.latent_shape():
            raise ValueError(f"images of {tuple(x.shape[-2:])} give latents {tuple(z.shape[1:])}, but the net "
                             f"takes {self.net.latent_shape()}: set {self.net.config_key}.latent_size to "
                             f"data.decode.image_size / {self.tokenizer.downsample_factor}")
        return z
