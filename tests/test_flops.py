"""The modules' training FLOP counts (``flops_per_batch``, which the MFU gauge divides by) against
torch's FlopCounterMode: 3x the forward of each module's training step on a real batch of the
tiny emoji set, within 5%, at sequence lengths where attention is a sizeable part of the total so
that a count without it cannot pass. Only the frozen tokenizer / autoencoder is replaced, by
stand-ins that cost no FLOPs (it is not part of the count)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_cfg, tiny_data_overrides
from unifuse.models.pixels import PixelSpace
from unifuse.run.flops import count_forward, flop_counter, forward_flops

BACKBONE = ["model.net.transformer.dim=64", "model.net.transformer.n_layers=2", "model.net.transformer.n_heads=2",
            "data.collator.seq_len=256"]
CASES = {
    "ar_gpt": ["model=ar_gpt", *BACKBONE],
    "maskgit": ["model=maskgit", *BACKBONE],
    "ldm": ["model=ldm", "model.net.dit.dim=64", "model.net.dit.n_layers=2", "model.net.dit.n_heads=2",
            "model.net.dit.text_dim=32", "model.net.dit.patch_size=1"],
    "transfusion_linear": ["model=transfusion", *BACKBONE, "model.net.image.patch_encoder=linear",
                           "model.net.image.time_conditioning=input"],
    "transfusion_adaln": ["model=transfusion", *BACKBONE, "model.net.image.patch_encoder=linear",
                          "model.net.image.time_conditioning=adaln"],
    "transfusion_unet": ["model=transfusion", *BACKBONE, "model.net.image.patch_encoder=unet",
                         "model.net.image.patch_size=2", "model.net.image.unet_channels=32",
                         "data.collator.image_tokens=16"],
}
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training steps run without a Trainer
MASK_DRAWS = 8  # MaskGIT's LM head runs at the masked codes, a random number: average this many steps


def module_and_batch(case: str, data_dir, out_dir):
    """The case's LightningModule (tiny config) and the first training batch of its datamodule."""
    cfg = compose_cfg([*CASES[case], *tiny_data_overrides(data_dir), "model.tokenizer_ckpt=unused.ckpt"], out_dir)
    dm, module = instantiate(cfg.data), instantiate(cfg.model)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if case in ("ar_gpt", "maskgit"):  # the VQ tokenizer fills the image blocks: random codes instead
        g, codes = module.net.grid, module.net.vocab.image_codes
        tok = SimpleNamespace(to=lambda device: None, encode=lambda x: torch.randint(codes, (len(x), g, g)))
    else:  # the KL autoencoder: the identity on latent-shaped "images"
        tok = PixelSpace(module.net.latent_shape()[0])
        batch = {**batch, "image": torch.randn(len(batch["image"]), *module.net.latent_shape())}
    object.__setattr__(module, "tokenizer", tok)
    module.p_uncond = 0.0  # the DiT's caption dropout shortens the caption rows; flops_per_batch counts them whole
    return module, batch


def counted(module, batch, draws: int = 1) -> tuple[float, float]:
    """(total, attention) forward FLOPs of the training step, averaged over ``draws`` steps."""
    total = attention = 0.0
    for _ in range(draws):
        c = count_forward(module.training_step, batch, 0)
        total += c.get_total_flops()
        attention += sum(v for op, v in c.get_flop_counts()["Global"].items() if "attention" in str(op))
    return total / draws, attention / draws


@pytest.mark.parametrize("case", list(CASES))
def test_flops_per_batch_is_three_forwards_as_torch_counts_them(case, tiny_emoji, tmp_path):
    torch.manual_seed(0)
    module, batch = module_and_batch(case, tiny_emoji, tmp_path)
    fwd, attention = counted(module, batch, MASK_DRAWS if case == "maskgit" else 1)
    assert attention > 0.1 * fwd, f"attention is {attention / fwd:.1%} of the forward: too little to be checked"
    assert module.flops_per_batch(batch) == pytest.approx(3 * fwd, rel=0.05)


def test_transfusion_text_only_batch_counts_no_image_side(tiny_emoji, tmp_path):
    """A batch of text-only documents runs the backbone alone (its adaLN projections included: none run)."""
    from unifuse.data.collate import PackingCollator
    from unifuse.data.samples import Sample

    module, _ = module_and_batch("transfusion_adaln", tiny_emoji, tmp_path)
    net = module.net
    pc = PackingCollator(batch_size=2, seq_len=256, vocab=net.vocab, image_tokens=net.n_patches, seed=0)
    for i in range(12):
        pc.add(Sample(key=f"t{i}", url="", text=f"document {i} says something about emoji number {i * 7}"))
    batch = pc.pop()
    assert "image_pos" not in batch
    fwd, attention = counted(module, batch)
    assert attention > 0.1 * fwd
    assert module.flops_per_batch(batch) == pytest.approx(3 * fwd, rel=0.05)
    assert module.image_flops() > net.net.flops_per_cond() > 0  # what an image batch adds, per image


def test_cpu_attention_is_counted_over_every_pair_whatever_the_mask():
    """FlopCounterMode alone counts CPU attention as zero; forward_flops counts q.k and the weighted
    values over all (query, key) pairs, 2 * 2 * B * H * Lq * Lk * D, causal, masked or not, through
    the attention the models call: SDPA's CPU kernel in float32, its math kernel (plain matmuls) for
    short bfloat16 keys, and long bfloat16 keys on the CPU kernel again."""
    from unifuse.models.attention import CPU_BF16_MATH_BELOW, sdpa

    b, h, lq, d = 2, 3, 40, 16
    g = torch.Generator().manual_seed(0)
    for lk in (56, CPU_BF16_MATH_BELOW + 8):
        q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
        mask = torch.from_numpy(np.random.default_rng(0).random((b, 1, lq, lk)) > 0.5)
        for kw in ({}, {"attn_mask": mask}):
            for dtype in (torch.float32, torch.bfloat16):
                x = [t.to(dtype) for t in (q, k, v)]
                assert forward_flops(sdpa, *x, **kw) == 4 * b * h * lq * lk * d, (lk, kw, dtype)
    square = [t[:, :, :lq] for t in (q, k, v)]
    assert forward_flops(sdpa, *square, is_causal=True) == 4 * b * h * lq * lq * d
    # the backward too (torch's formula: 5 products of that size, the scores recomputed)
    x = [t.clone().requires_grad_() for t in square]
    with flop_counter() as counter:
        sdpa(*x, is_causal=True).sum().backward()
    assert counter.get_total_flops() == (4 + 10) * b * h * lq * lq * d
