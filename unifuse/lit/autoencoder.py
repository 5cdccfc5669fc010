"""LightningModules of the autoencoders (VQ-VAE tokenizer, KL autoencoder). What both share lives in
:class:`ReconstructionModule`: the reconstruction loss (L1/MSE, plus LPIPS from a local weights file
when ``perceptual_weight > 0``), the adversarial term (PatchGAN, hinge, taming's adaptive weight,
from ``adversarial.start_step``; ``adversarial.weight > 0`` turns a VQ-VAE into a VQGAN), PSNR/SSIM,
FLOPs and original-vs-reconstruction grids. Each subclass adds its bottleneck (:meth:`bottleneck`).

With the adversarial term on, the module uses Lightning's manual optimisation with two optimizers
(autoencoder, discriminator); under DDP use ``trainer.strategy=ddp_find_unused_parameters_true``
(the discriminator takes no part in the autoencoder's backward and vice versa)."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn import functional as F
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from unifuse.lit.base import UnifuseModule, param_groups
from unifuse.models.discriminator import (
    AdversarialConfig,
    PatchDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from unifuse.models.lpips import LPIPS
from unifuse.run.flops import forward_flops


class ReconstructionModule(UnifuseModule):
    def __init__(self, net, optimizer=None, scheduler=None, weight_decay: float = 0.0, recon_loss: str = "l1",
                 num_log_images: int = 16, adversarial: AdversarialConfig | None = None,
                 perceptual_weight: float = 0.0, lpips_weights: str | None = None):
        super().__init__(optimizer, scheduler, weight_decay)
        if recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', not {recon_loss!r}")
        self.net, self.recon_loss, self.num_log_images = net, recon_loss, num_log_images
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.adv = adversarial if adversarial is not None and adversarial.weight > 0 else None
        if self.adv is not None:
            self.discriminator = PatchDiscriminator(net.ae_cfg.in_channels, self.adv.channels, self.adv.layers)
            self.automatic_optimization = False
        self.perceptual_weight = float(perceptual_weight)
        self.lpips = None
        if self.perceptual_weight > 0:
            # frozen helper, not a submodule: not trained, not in the checkpoint
            object.__setattr__(self, "lpips", LPIPS.from_file(lpips_weights, "model.lpips_weights"))

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if self.adv is not None and isinstance(strategy, DDPStrategy) and self.trainer.world_size > 1 \
                and not strategy._ddp_kwargs.get("find_unused_parameters"):
            # each of the two backward passes leaves the other net without gradients, which plain
            # DDP reports as an error in the next step, far from its cause
            raise ValueError("the adversarial term trains two nets in turn: under DDP set "
                             "trainer.strategy=ddp_find_unused_parameters_true (or model.adversarial.weight=0)")

    # ------------------------------------------------------------------ subclass hook
    def bottleneck(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict, object]:
        """images -> (reconstruction, the bottleneck's loss term (already weighted), values to log,
        anything the subclass wants back in :meth:`after_train_step`)."""
        raise NotImplementedError

    def after_train_step(self, aux) -> None:
        """Called with ``bottleneck``'s last value after each training step."""

    # ------------------------------------------------------------------ losses
    def reconstruction_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(recon, x) if self.recon_loss == "l1" else F.mse_loss(recon, x)

    def _losses(self, x: torch.Tensor):
        recon, extra, logs, aux = self.bottleneck(x)
        rec = self.reconstruction_loss(recon, x)
        logs = {"recon": rec, **logs}
        nll = rec
        if self.lpips is not None:
            self.lpips.to(x.device)
            p = self.lpips(recon, x).mean()
            logs["lpips"] = p
            nll = rec + self.perceptual_weight * p
        return recon, nll, extra, logs, aux

    def _gan_on(self) -> bool:
        return self.trainer.fit_loop.total_batch_idx >= self.adv.start_step

    def training_step(self, batch: dict, batch_idx: int):
        x = batch["image"]
        recon, nll, extra, logs, aux = self._losses(x)
        loss = nll + extra
        if self.adv is not None:
            loss, ok = self._adversarial_step(x, recon, nll, loss, logs, batch)
        else:
            logs["loss"] = loss
            ok = self.finite_losses(logs, batch)  # skipped: the guard drops the gradients before the step
        if ok:
            self.after_train_step(aux)
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _adversarial_step(self, x, recon, nll, loss, logs, batch) -> tuple[torch.Tensor, bool]:
        opt_g, opt_d = self.optimizers()
        on = self._gan_on()
        if on:
            g = hinge_g_loss(self.discriminator(recon))
            w = adaptive_weight(nll, g, self.net.decoder.conv_out.weight) if self.adv.adaptive else torch.ones(())
            loss = loss + self.adv.weight * w * g
            logs.update(g_loss=g, adaptive_weight=w)
            # the discriminator's loss before either step, so a non-finite one drops the whole batch
            # (the discriminator is the same before and after the autoencoder's step)
            logs["d_loss"] = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(recon.detach()))
        logs["loss"] = loss
        if not self.finite_losses(logs, batch):
            return loss.detach(), False
        clip = self.manual_clipping  # trainer.gradient_clip_val, moved here (Lightning refuses it here)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_and_log(opt_g, *clip)
        opt_g.step()
        if on:
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(logs["d_loss"])
            self.clip_and_log(opt_d, *clip, name="train/d_grad_norm")
            opt_d.step()
        for sch in self.lr_schedulers() or []:
            sch.step()
        return loss.detach(), True

    def configure_optimizers(self):
        if self.adv is None:
            return super().configure_optimizers()
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (model.optimizer)")
        opt_g = self.optimizer_factory(param_groups(self.net, self.weight_decay))
        extra = {"lr": self.adv.lr} if self.adv.lr else {}
        opt_d = self.optimizer_factory(self.discriminator.parameters(), **extra)
        if self.scheduler_factory is None:
            return [opt_g, opt_d]
        total = self.trainer.estimated_stepping_batches
        return [opt_g, opt_d], [self.scheduler_factory(opt_g, total_steps=total),
                                self.scheduler_factory(opt_d, total_steps=total)]

    # ------------------------------------------------------------------ validation and images
    def validation_step(self, batch: dict, batch_idx: int):
        x = batch["image"]
        recon, nll, extra, logs, _ = self._losses(x)
        self.update_image_metrics(recon, x)
        self.log_dict({"val/loss": nll + extra, **{f"val/{k}": v for k, v in logs.items()}}, sync_dist=True,
                      batch_size=x.shape[0], prog_bar=True)

    @torch.no_grad()
    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of one batch: the forward counted by torch's FlopCounterMode (CPU attention
        included, :mod:`unifuse.run.flops`), x3."""
        x = batch["image"]
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
        return 3.0 * forward_flops(self.net, x[:1]) * len(x)

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
