"""Transfusion: the mask against a reference construction, KV-cached sampling against full
recomputation, loss masking and per-image times, and model=transfusion trained from Hydra (in
process, 2-process DDP, and a DDP multirun over the loss weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import compose_cfg, tiny_data_overrides
from tests.test_distributed import run, run_dirs
from unifuse.data.collate import IMAGE, TEXT, PackingCollator
from unifuse.data.samples import Sample
from unifuse.decoding import transfusion as decoding
from unifuse.decoding.document import document
from unifuse.models.attention import MaskSpec, attend, dense_mask
from unifuse.models.transformer import TransformerConfig
from unifuse.models.transfusion import Transfusion, TransfusionConfig


def tiny_model(transport: str = "ddpm", **image) -> Transfusion:
    from unifuse.diffusion import DiffusionConfig

    torch.manual_seed(0)
    cfg = TransfusionConfig(latent_size=4, diffusion=DiffusionConfig(transport=transport, schedule="cosine"), **image)
    m = Transfusion(TransformerConfig(dim=32, n_layers=2, n_heads=2), cfg).eval()
    with torch.no_grad():  # the zero-initialised output head (and adaLN): give them something to say
        (m.unet.conv_out if m.unet is not None else m.patch_out).weight.normal_(0, 0.02)
        for layer in m.net.layers:
            if layer.ada is not None:
                layer.ada.proj.weight.normal_(0, 0.05)
    return m


def random_batch(m: Transfusion, seed: int, rows: int = 3, seq_len: int = 96, docs: int = 8):
    """Packed rows of caption/image documents in both orders, plus an interleaved one."""
    rng = np.random.default_rng(seed)
    pc = PackingCollator(batch_size=rows, seq_len=seq_len, vocab=m.vocab, image_tokens=m.n_patches,
                         caption_first=0.5, seed=seed)
    for i in range(docs):
        lat = rng.standard_normal((8, 4, 4)).astype(np.float16)
        pc.add(Sample(key=f"k{i}", url="", text="ab" * int(rng.integers(0, 6)), codes=lat))
    return pc.pop()


def reference_mask(doc: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
    """The Transfusion mask written out position by position."""
    b, n = doc.shape
    m = torch.zeros(b, n, n, dtype=torch.bool)
    for r in range(b):
        for q in range(n):
            for k in range(n):
                if doc[r, q] < 0 or doc[r, k] != doc[r, q]:
                    m[r, q, k] = q == k and doc[r, q] < 0  # padding sees itself only
                    continue
                same_image = image_id[r, q] >= 0 and image_id[r, q] == image_id[r, k]
                m[r, q, k] = k <= q or same_image
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_matches_the_reference_on_random_packed_layouts_and_flex_equals_dense(seed):
    m = tiny_model()
    batch = random_batch(m, seed)
    assert (batch["image_id"] >= 0).sum() >= 3 * m.n_patches and batch["doc_id"].max() >= 1  # images, packing
    spec = MaskSpec(True, batch["doc_id"], batch["image_id"])
    n = batch["tokens"].shape[1]
    assert torch.equal(dense_mask(spec, n, n, "cpu")[:, 0], reference_mask(batch["doc_id"], batch["image_id"]))
    q, k, v = (torch.randn(3, 2, n, 16) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, MaskSpec(True, batch["doc_id"], batch["image_id"]), "flex"),
                               attend(q, k, v, MaskSpec(True, batch["doc_id"], batch["image_id"]), "dense"),
                               atol=1e-5, rtol=1e-4)


def test_mask_is_built_once_per_forward(monkeypatch):
    from unifuse.models import attention

    calls = []
    real = attention.dense_mask
    monkeypatch.setattr(attention, "dense_mask", lambda *a: calls.append(1) or real(*a))
    m = tiny_model()
    batch = random_batch(m, 0)
    m(batch, batch["latents"][:, :4], torch.zeros(len(batch["latents"]), dtype=torch.long))
    assert len(calls) == 1 and m.net.cfg.n_layers == 2


@pytest.mark.parametrize("transport,sampler,encoder", [("ddpm", "ddim", "linear"), ("flow", "heun", "linear"),
                                                      ("flow", "euler", "unet"), ("flow", "heun", "linear+adaln")])
def test_kv_cached_sampling_equals_full_recomputation(transport, sampler, encoder):
    encoder, _, timing = encoder.partition("+")
    m = tiny_model(transport, patch_encoder=encoder, unet_channels=16, unet_blocks=1,
                   patch_size=2 if encoder == "unet" else 1, time_conditioning=timing or "input")
    prompts = ["abc", "a much longer caption", ""]
    for cfg in (None, 3.0):
        a = decoding.generate(m, prompts, sampler=sampler, steps=4, cfg_scale=cfg, seed=7, use_cache=True)
        b = decoding.generate(m, prompts, sampler=sampler, steps=4, cfg_scale=cfg, seed=7, use_cache=False)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # a prompt gives the same image alone as in a batch (per-row seeds, padding masked)
    alone = decoding.generate(m, prompts[1:2], sampler=sampler, steps=4, cfg_scale=3.0, seed=8)
    torch.testing.assert_close(alone[0], a[1], atol=1e-4, rtol=1e-4)


def test_an_image_inside_a_document_matches_text_to_image_and_captions_decode_with_the_cache():
    """The document decoder's cache (built token by token, with a spliced unconditional row) gives
    the same image as the batched text-to-image sampler; greedy captions agree with the likelihood."""
    m = tiny_model()
    segs = document(m, ["abc", None, "de", None], sampler="ddim", steps=3, cfg_scale=2.0, seed=4)
    assert [list(s) for s in segs] == [["text"], ["image"], ["text"], ["image"]]
    ref = decoding.generate(m, ["abc"], sampler="ddim", steps=3, cfg_scale=2.0, seed=5)  # image k: seed + 1 + k
    torch.testing.assert_close(segs[1]["image"], ref[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(segs[1]["image"], segs[3]["image"])
    # captions decoded with the cache are the greedy choices of a full forward over the same tokens
    z = torch.randn(2, 4, 4, 4)
    ids = decoding.caption_ids(m, z, max_new_tokens=6, temperature=0.0)
    prefix, t0 = decoding.image_prefix(m, len(z), z.device).batch(), m.diffusion.clean_time(len(z), z.device)
    k = prefix["tokens"].shape[1]
    for r, row in enumerate(ids):
        batch = {key: v[r:r + 1] for key, v in prefix.items()}
        full = torch.tensor([row], dtype=torch.long)
        batch["tokens"] = torch.cat([batch["tokens"], full], 1)
        batch["position"] = torch.arange(k + len(row))[None]
        batch["doc_id"] = torch.zeros_like(batch["tokens"])
        batch["image_id"] = torch.cat([batch["image_id"], torch.full_like(full, -1)], 1)
        batch["image_pos"] = batch["image_pos"][:1] * 0 + torch.tensor([[0, 2, m.n_patches]])
        logits = m(batch, z[r:r + 1], t0[r:r + 1])[0][0, k - 1:]
        greedy = decoding.text_logits(m, logits, False).argmax(-1).tolist()
        assert greedy[: len(row)] == row
        assert len(row) == 6 or greedy[len(row)] == m.vocab.eos


def test_caption_likelihoods_do_not_depend_on_the_rows_scored_beside_them():
    """Caption retrieval scores many (image, caption) rows in one pass: each row's log-likelihood must
    equal the one it gets alone, whatever the other rows' images and caption lengths (padding)."""
    m = tiny_model()
    z = torch.randn(4, 4, 4, 4)
    caps = ["a", "abcabcabc", "", "ab ab"]
    together = decoding.caption_logprob(m, z, caps)
    alone = torch.cat([decoding.caption_logprob(m, z[i:i + 1], [c]) for i, c in enumerate(caps)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert together.unique().numel() == 4


def test_loss_masking_and_per_image_times():
    m = tiny_model()
    batch = random_batch(m, 3)
    tok, mod = batch["tokens"], batch["modality"]
    target = m.text_targets(batch)
    inputs = tok[:, :-1]
    assert not target[inputs == m.vocab.boi].any()  # nothing is learnt from the prediction at BOI
    assert not target[mod[:, :-1] == IMAGE].any() and not target[mod[:, 1:] == IMAGE].any()
    assert not target[batch["doc_id"][:, 1:] < 0].any()  # nor from padding or across documents
    # every caption token, BOI, EOS and the text after EOI is a target
    expected = (tok[:, 1:] < m.vocab.text_size) | (tok[:, 1:] == m.vocab.eos) | (tok[:, 1:] == m.vocab.boi)
    expected &= (batch["doc_id"][:, 1:] >= 0) & (tok[:, 1:] != m.vocab.bos) & (mod[:, :-1] == TEXT)
    assert torch.equal(target, expected) and target.sum() > 0
    # the caption text of a document is a target; EOI -> next text too
    assert target[inputs == m.vocab.eoi].all() or not (inputs == m.vocab.eoi).any()

    first = batch["image_first"]
    assert first.any() and (~first).any()
    t = torch.stack([m.sample_times(first) for _ in range(200)])
    assert int(t[:, first].max()) <= 500 and int(t[:, ~first].max()) > 500  # the cap, image-first only
    assert len(set(t[0].tolist())) > 1  # each image its own time

    # the image loss sees image positions only: a text token's embedding change leaves it alone,
    # and each image's prediction depends on its own time
    z = batch["latents"][:, :4]
    t0 = torch.full((len(z),), 300)
    eps = torch.randn_like(z)
    base = m.loss(batch, z, t0, eps)
    t1 = t0.clone()
    t1[0] = 900
    moved = m.loss(batch, z, t1, eps)
    assert not torch.isclose(base["image_loss"], moved["image_loss"])
    with torch.no_grad():
        m.net.tok_emb.weight[m.vocab.pad] += 1.0  # placeholders are replaced by patches
    same = m.loss(batch, z, t0, eps)
    torch.testing.assert_close(same["loss"], base["loss"])


@pytest.mark.parametrize("where,pos", [("before", False), ("after", False), ("after", True)])
def test_time_embedding_joins_each_patch_vector_before_or_after_the_patch_layer(where, pos):
    """``before`` (the paper): patch_in(patch + tau(t)) for every patch of the image; ``after``:
    patch_in(patch) + time_mlp(t); ``pos_emb_2d`` adds the 2D sin-cos term. Patches are cut here
    by F.unfold, independently of the model's own patchify."""
    from torch.nn import functional as F

    from unifuse.models.dit import sincos_2d, timestep_embedding

    m = tiny_model(patch_size=2, time_embedding=where, pos_emb_2d=pos)
    z, t = torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 990])
    with torch.no_grad():
        x, _ = m.embed_image(z, t)
        temb = m.t_mlp(timestep_embedding(t, 256))
        patches = F.unfold(z, kernel_size=2, stride=2).transpose(1, 2)  # (3, 4 patches, 4 x 2 x 2)
        if where == "before":
            ref = m.patch_in(patches + m.t_patch(F.silu(temb))[:, None])
        else:
            ref = m.patch_in(patches) + (sincos_2d(2, 32) if pos else 0) + temb[:, None]
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    assert (m.t_patch is None) == (where == "after") and hasattr(m, "pos_emb") == pos


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_a_config_stored_before_the_recipe_options_loads_as_it_was_trained(encoder):
    """A checkpoint's stored config from before time_embedding / pos_emb_2d / unet_attention /
    unet_time_norm existed rebuilds the model it was trained as (time after the patch layer, the 2D
    position term, a U-Net with time-conditioned norms and no attention), not today's defaults: its
    weights load strictly and it computes the same."""
    from unifuse.models.transfusion import STORED_BEFORE_OPTION

    old = tiny_model(patch_encoder=encoder, patch_size=2, unet_channels=16, unet_blocks=1, **STORED_BEFORE_OPTION)
    stored = old.config()
    for key in STORED_BEFORE_OPTION:
        del stored["image"][key]
    new = Transfusion.from_config(stored).eval()
    assert {k: getattr(new.icfg, k) for k in STORED_BEFORE_OPTION} == STORED_BEFORE_OPTION
    new.load_state_dict(old.state_dict(), strict=True)
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([100, 700])
    torch.testing.assert_close(new.embed_image(z, t)[0], old.embed_image(z, t)[0])
    # a config that has the keys keeps them
    assert Transfusion.from_config(tiny_model(patch_encoder=encoder, patch_size=2).config()).icfg.time_embedding \
        == "before"


def test_document_text_is_never_cut_and_a_document_beyond_the_context_is_refused():
    """Training feeds interleaved text whole, so ``document`` must too (captions are cut at
    max_text_len, document text is not); a document that cannot fit ``max_seq_len`` fails naming it."""
    m = tiny_model(max_text_len=4)
    a = document(m, ["abcdefgh", None], steps=2, seed=3)
    b = document(m, ["abcdXXXX", None], steps=2, seed=3)
    assert a[0] == {"text": "abcdefgh"}
    assert not torch.allclose(a[1]["image"], b[1]["image"])  # the image sees the text past 4 tokens
    short = Transfusion(TransformerConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=40), m.icfg)
    with pytest.raises(ValueError, match=r"needs up to 50 positions .*model\.net\.transformer\.max_seq_len = 40"):
        document(short, ["x" * 30, None], max_images=1, steps=2)
    assert len(document(short, ["x" * 20, None], max_images=1, steps=2)) == 2  # 2 + 20 + 18 = 40 fits


def test_text_only_documents_train_the_language_model():
    """Text-only documents are LM targets beside image documents, and a batch of text only trains
    the backbone while the image side stays in the graph with a zero gradient (DDP needs every
    parameter to get one)."""
    m = tiny_model().train()
    pc = PackingCollator(batch_size=2, seq_len=96, vocab=m.vocab, image_tokens=m.n_patches, seed=0)
    pc.add(Sample(key="img", url="", text="ab", codes=np.zeros((8, 4, 4), np.float16)))
    pc.add(Sample(key="txt", url="", text="a text-only document"))
    mixed = pc.pop()
    text_doc = (mixed["doc_id"] == 1) & (mixed["tokens"] < m.vocab.text_size)
    assert int(text_doc.sum()) == len("a text-only document")
    assert m.text_targets(mixed)[text_doc[:, 1:]].all()  # all its tokens after BOS are targets
    pc.add(Sample(key="t1", url="", text="only words here"))
    pc.add(Sample(key="t2", url="", text="and more words"))
    text_only = pc.pop()
    assert "image_pos" not in text_only and "latents" not in text_only
    out = m.loss(text_only, None)
    assert out["image_loss"].item() == 0.0 and torch.equal(out["loss"], out["text_loss"]) and out["loss"] > 0
    out["loss"].backward()
    assert m.net.tok_emb.weight.grad.abs().sum() > 0
    for p in m.image_parameters():
        assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("encoder,conditioning", [("linear", "input"), ("linear", "adaln"), ("unet", "adaln")])
def test_a_text_only_batch_gives_every_parameter_a_gradient(encoder, conditioning):
    """DDP (without find_unused_parameters) fails the step after a backward that leaves any parameter
    without a gradient: the adaLN projections inside the backbone as much as the patch layers."""
    m = tiny_model(patch_encoder=encoder, patch_size=2 if encoder == "unet" else 1, unet_channels=16,
                   unet_blocks=1, time_conditioning=conditioning).train()
    pc = PackingCollator(batch_size=2, seq_len=48, vocab=m.vocab, image_tokens=m.n_patches, seed=0)
    for i in range(4):
        pc.add(Sample(key=f"t{i}", url="", text=f"words and more words {i}"))
    m.loss(pc.pop(), None)["loss"].backward()
    missing = [name for name, p in m.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert m.net.layers[0].attn.wq.weight.grad.any()  # the text path trains; the image side gets zeros
    assert not any(p.grad.any() for p in m.image_parameters())


@pytest.mark.parametrize("conditioning", ["input", "adaln"])
def test_ddp_trains_on_text_only_batches(tiny_emoji, tiny_kl, tmp_path, conditioning):
    """Two ranks on a text-only source: no rank has an image, and DDP still finds a gradient for
    every parameter, with either time conditioning (adaln adds image-only projections to every block)."""
    from unifuse.data.writer import ShardWriter

    with ShardWriter(tmp_path / "text", prefix="text", max_samples=20) as w:
        for i in range(40):
            w.write(f"t{i}", {"txt": f"document {i} says something about emoji number {i * 7}"})
    args = transfusion_overrides(tiny_emoji, tiny_kl) + [
        f"paths.root_dir={tmp_path}", "logger=csv", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
        "+trainer.limit_val_batches=1", "callbacks.fidelity.enabled=false", "~data.train.emoji",
        f"+data.train.text={{shards: {tmp_path / 'text'}, weight: 1.0}}", "data.collator.batch_size=2",
        f"model.net.image.time_conditioning={conditioning}"]
    run(args, tmp_path)
    dirs = run_dirs(tmp_path / "outputs")
    ck = torch.load(dirs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] >= 3  # DDP complains about a parameter without gradient from the 2nd step


def transfusion_overrides(data_dir, kl) -> list[str]:
    return ["model=transfusion", *tiny_data_overrides(data_dir), f"model.tokenizer_ckpt={kl}",
            "model.net.transformer.dim=32", "model.net.transformer.n_layers=2", "model.net.transformer.n_heads=2",
            "data.collator.seq_len=128", "model.sampling.steps=3", "model.retrieval_images=16",
            "model.sample_prompts=[twemoji dog face,openmoji pizza]"]


def test_model_transfusion_trains_from_hydra_samples_captions_and_evaluates(tiny_emoji, tiny_kl, domain_weights,
                                                                             tmp_path):
    from unifuse.run.checkpoint import load_pipeline
    from unifuse.train import train

    r = train(compose_cfg(transfusion_overrides(tiny_emoji, tiny_kl) + [
        "trainer=debug_limit", "trainer.max_epochs=1", "logger=csv", f"eval.domain_weights={domain_weights}"],
        tmp_path))
    metrics = r["metrics"]
    for key in ("val/loss", "val/text_loss", "val/image_loss", "val/caption_bpb", "val/caption_top1"):
        assert key in metrics, key
    assert 0.0 <= metrics["val/caption_top1"] <= 1.0
    assert any(k.startswith("eval/fid@domain") for k in metrics), metrics  # the summary prints it
    pipe, ck = load_pipeline(r["checkpoint"])
    assert ck.kind == "transfusion"
    x = pipe.generate(["twemoji dog face", "openmoji pizza"], steps=3)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    caps = pipe.caption(x, max_new_tokens=4)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    segs = pipe.document(["twemoji dog face", None, "openmoji pizza", None], steps=2)
    assert [s["image"].shape for s in segs if "image" in s] == [(3, 16, 16)] * 2

    # the sampling CLI: text -> image, image -> text, and an interleaved document with two images
    from PIL import Image

    from unifuse.sample import main as sample_main

    ckpt = r["checkpoint"]
    grid = sample_main([f"ckpt={ckpt}", "prompt=twemoji dog face", "n=2", "steps=2", f"out={tmp_path}/t2i.png"])
    assert Image.open(grid).size[0] > 0
    png = tmp_path / "in.png"
    Image.fromarray(((x[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()).save(png)
    out = sample_main([f"ckpt={ckpt}", "mode=caption", f"image={png}|{png}", "max_new_tokens=4",
                       f"out={tmp_path}/cap.png"])
    assert out.is_file()
    out = sample_main([f"ckpt={ckpt}", "mode=document", "prompt='twemoji dog face<image>openmoji pizza<image>'",
                       "steps=2", "max_new_tokens=0", f"out={tmp_path}/doc.png"])
    assert Image.open(out).size[0] > Image.open(out).size[1]  # two images side by side


def test_ddp_two_processes_transfusion(tiny_emoji, tiny_kl, tmp_path):
    args = transfusion_overrides(tiny_emoji, tiny_kl) + [
        f"paths.root_dir={tmp_path}", "logger=csv", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
        "+trainer.limit_val_batches=1", "callbacks.fidelity.enabled=false"]
    run(args, tmp_path)
    dirs = run_dirs(tmp_path / "outputs")
    assert len(dirs) == 1 and (dirs[0] / "train_ddp_process_1.log").is_file()
    ck = torch.load(dirs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["unifuse"]["kind"] == "transfusion"


def test_multirun_over_the_loss_weight_with_ddp(tiny_emoji, tiny_kl, tmp_path):
    args = ["-m", "model.net.image.diffusion_weight=1.0,5.0", *transfusion_overrides(tiny_emoji, tiny_kl),
            f"paths.root_dir={tmp_path}", "logger=csv", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "callbacks.fidelity.enabled=false"]
    run(args, tmp_path)
    jobs = sorted((tmp_path / "outputs" / "multiruns").glob("*/*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    for j, w in zip(jobs, (1.0, 5.0), strict=True):
        assert (j / "train_ddp_process_1.log").is_file()
        ck = torch.load(j / "checkpoints" / "last.ckpt", weights_only=True)
        assert ck["unifuse"]["config"]["image"]["diffusion_weight"] == w


@pytest.mark.parametrize("time_norm", [False, True])
def test_unet_patch_encoder_trains_both_halves_and_downsamples_by_the_patch_size(time_norm):
    """The default U-Net is the paper's: plain norms and a self-attention block after every residual
    block; ``unet_time_norm`` puts the time embedding into the blocks' norms instead (ADM's)."""
    m = tiny_model("flow", patch_encoder="unet", unet_channels=16, unet_blocks=2, patch_size=2,
                   unet_time_norm=time_norm).train()
    assert m.n_patches == 4 and not hasattr(m, "patch_in")
    assert all((blk.emb is not None) == time_norm for blk in [*m.unet.down, *m.unet.up])
    assert len(m.unet.down_attn) == len(m.unet.down) == 4 and len(m.unet.up_attn) == 4
    batch = random_batch(m, 0)
    m.loss(batch, batch["latents"][:, :4])["loss"].backward()
    names = ["down.0.conv1.weight", "up.0.conv1.weight", "conv_out.weight", "to_tokens.weight",
             "down_attn.3.proj.weight", "up_attn.0.proj.weight"] + (["down.3.emb.weight"] if time_norm else [])
    for name in names:
        g = dict(m.unet.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_unet_attention_block_is_multi_head_attention_over_all_positions():
    """AttnBlock against attention written out with einsum: every position of the map attends to
    every other, per head."""
    from unifuse.models.autoencoder import AttnBlock

    torch.manual_seed(0)
    blk = AttnBlock(8, groups=4, heads=2)
    torch.nn.init.normal_(blk.proj.weight, std=0.3)
    x = torch.randn(2, 8, 3, 5)
    q, k, v = blk.qkv(blk.norm(x)).flatten(2).view(2, 3, 2, 4, 15).unbind(1)  # (b, heads, c/heads, hw)
    w = torch.einsum("bhcq,bhck->bhqk", q, k).div(4**0.5).softmax(-1)
    ref = x + blk.proj(torch.einsum("bhqk,bhck->bhcq", w, v).reshape(2, 8, 3, 5))
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)
    far = x.clone()
    far[:, :, 0, 0] += 1.0
    assert not torch.allclose(blk(far)[:, :, 2, 4], blk(x)[:, :, 2, 4])  # a corner sees the other corner


def test_pixel_space_transfusion_trains_and_samples_without_an_autoencoder(tiny_emoji, tmp_path):
    """``autoencoder=identity``: raw 16x16 pixels cut into 4x4 patches, no autoencoder file anywhere;
    the checkpoint samples images of the data's size."""
    from unifuse.run.checkpoint import load_pipeline
    from unifuse.train import train

    over = [o for o in transfusion_overrides(tiny_emoji, "unused") if not o.startswith("model.tokenizer_ckpt")]
    cfg = compose_cfg(over + ["autoencoder=identity", "data.collator.image_tokens=16", "trainer=debug_limit",
                              "trainer.max_epochs=1", "logger=none", "callbacks.fidelity.enabled=false"], tmp_path)
    assert cfg.model.tokenizer_ckpt == "identity" and cfg.model.net.image.latent_channels == 3
    assert cfg.data.train.emoji.shards == str(tiny_emoji / "train")  # the image shards, not latents
    r = train(cfg)
    pipe, ck = load_pipeline(r["checkpoint"])
    assert ck.tokenizer["kind"] == "identity" and ck.tokenizer["path"] == "identity"
    x = pipe.generate(["twemoji dog face"], steps=2)
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()
    assert pipe.caption(x, max_new_tokens=3)[0] is not None


# ---------------------------------------------------------------------------- validation metrics
def validate_twice(overrides: list[str], tmp_path, setup=None) -> list[dict]:
    """Two Lightning validation passes over the same weights: the metrics each logged. The
    zero-initialised layers (output heads, adaLN gates) get small random weights first, so that the
    image predictions depend on the latents; then ``setup(model)`` runs."""
    import lightning as L
    from hydra.utils import instantiate

    cfg = compose_cfg(overrides + ["logger=none"], tmp_path)
    data, model = instantiate(cfg.data), instantiate(cfg.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    if setup is not None:
        setup(model)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    return [{k: float(v) for k, v in trainer.validate(model, datamodule=data, verbose=False)[0].items()}
            for _ in range(2)]


def test_two_validation_passes_of_the_same_weights_log_the_same_numbers(tiny_emoji, tiny_kl, tmp_path):
    """Validation takes the autoencoder's posterior mean: the image loss and the retrieval pool do not
    move between epochs unless the weights do (a posterior sample from the global generator did)."""
    first, second = validate_twice(transfusion_overrides(tiny_emoji, tiny_kl), tmp_path)
    for key in ("val/image_loss", "val/loss", "val/caption_bpb", "val/caption_top1", "val/caption_top1_pmi",
                "val/caption_exact", "val/caption_f1"):
        assert key in first, key
    assert first == second


def test_validation_caption_metrics_score_what_the_caption_methods_return(tiny_emoji, tiny_kl, tmp_path,
                                                                         monkeypatch):
    """With the caption decoders replaced by known ones:

    * val/caption_exact and val/caption_f1 score what ``caption`` decodes for the first
      ``caption_images`` validation images: every other caption right, the others empty, is 0.5;
    * val/caption_top1_pmi ranks by log p(c | image) - log p(c | no image): with a caption prior
      that favours short captions far more than the image favours the true one, the plain
      log-likelihood picks short captions while the difference finds every true caption."""
    calls = []

    def setup(model):
        real, pool = decoding.caption, lambda: model._pool

        def caption(net, z, **kw):
            calls.append(len(z))
            assert len(real(net, z, **kw)) == len(z)  # the real decoder runs on the same latents
            truth = [model.net.text_tokenizer.decode(model.net.text_ids(c)) for _, c in pool()]
            return [t.upper() if i % 2 == 0 else "" for i, t in enumerate(truth[: len(z)])]  # case is not scored

        def caption_logprob(net, z, caps):
            prior = torch.tensor([-10.0 * len(c) for c in caps])
            if z is None:
                return prior
            truth = [next(c for zp, c in pool() if torch.equal(zp, zi)) for zi in z]
            return prior + 5.0 * torch.tensor([float(c == t) for c, t in zip(caps, truth, strict=True)])

        monkeypatch.setattr(decoding, "caption", caption)
        monkeypatch.setattr(decoding, "caption_logprob", caption_logprob)

    metrics, _ = validate_twice(transfusion_overrides(tiny_emoji, tiny_kl) + ["model.caption_images=6"], tmp_path,
                                setup)
    assert calls == [6, 6]  # one batch of 6 images per pass
    assert metrics["val/caption_exact"] == pytest.approx(0.5) and metrics["val/caption_f1"] == pytest.approx(0.5)
    assert metrics["val/caption_top1_pmi"] == 1.0 and metrics["val/caption_top1"] < 0.5


def test_caption_match_is_exact_match_and_token_f1_on_lowercased_words():
    from unifuse.lit.transfusion import caption_match

    assert caption_match("Twemoji  Dog face ", "twemoji dog face") == (1.0, 1.0)
    exact, f1 = caption_match("twemoji dog", "twemoji dog face")  # precision 1, recall 2/3
    assert exact == 0.0 and f1 == pytest.approx(0.8)
    assert caption_match("dog dog", "dog dog face")[1] == pytest.approx(0.8)  # both "dog"s count
    assert caption_match("", "twemoji dog") == (0.0, 0.0) and caption_match("cat", "twemoji dog") == (0.0, 0.0)


def test_caption_scores_are_the_text_likelihoods_of_the_documents_the_collator_packs():
    """log p(caption | no image) is what the LM gives a caption-first document's caption and the BOI
    that ends it; log p(caption | image) the image-first document's caption and EOS after the clean
    latent: both read off a forward over the row ``PackingCollator`` builds, at the text targets
    training scores."""
    m = tiny_model()
    z = torch.randn(3, 4, 4, 4).half().float()  # latent shards hold float16
    caps = ["abc", "a longer caption", "ab ab"]
    scores = {False: decoding.caption_logprob(m, None, caps), True: decoding.caption_logprob(m, z, caps)}
    for first, end in ((False, m.vocab.boi), (True, m.vocab.eos)):
        for i, cap in enumerate(caps):
            pc = PackingCollator(batch_size=1, seq_len=96, vocab=m.vocab, image_tokens=m.n_patches,
                                 caption_first=0.0 if first else 1.0)
            pc.add(Sample(key="k", url="", text=cap, codes=torch.cat([z[i], torch.zeros_like(z[i])]).half().numpy()))
            batch = pc.pop()
            with torch.no_grad():
                logits = m(batch, batch["latents"][:, :4], torch.zeros(1, dtype=torch.long))[0]
            target = m.text_targets(batch)
            y = batch["tokens"][:, 1:][target]
            nats = torch.nn.functional.cross_entropy(logits[:, :-1][target], y, reduction="none")
            at = slice(1, len(cap) + 2) if first else slice(0, len(cap) + 1)  # image first: BOS -> BOI comes first
            assert int(y[at][-1]) == end and len(y[at]) == len(cap) + 1
            torch.testing.assert_close(scores[first][i], -nats[at].sum(), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(scores[False], scores[True])


def test_text_only_positions_mark_the_documents_without_an_image():
    from unifuse.lit.transfusion import text_only_positions

    m = tiny_model()
    pc = PackingCollator(batch_size=2, seq_len=96, vocab=m.vocab, image_tokens=m.n_patches, seed=0)
    for key, text, image in (("a", "ab", True), ("b", "words", False), ("c", "more words", False),
                             ("d", "", True)):
        pc.add(Sample(key=key, url="", text=text, codes=np.zeros((8, 4, 4), np.float16) if image else None))
    batch = pc.pop()
    mask = text_only_positions(batch)
    doc, has_image = batch["doc_id"], batch["image_id"] >= 0
    for r in range(2):
        for d in doc[r].unique().tolist():
            at = doc[r] == d
            assert bool((mask[r][at] == (d >= 0 and not has_image[r][at].any())).all()), (r, d)
    assert int(mask.sum()) == (2 + len("words")) + (2 + len("more words"))  # [BOS] text [EOS] of each


def test_bits_per_byte_count_text_only_documents_apart_from_documents_with_an_image():
    """The epoch sums behind val/text_bpb and val/caption_bpb: packed together, the text-only documents
    give the nats and bytes they give alone, and the image documents those of a batch of them alone
    (documents do not see each other)."""
    from unifuse.lit.transfusion import TransfusionModule

    module = TransfusionModule(tiny_model())
    m = module.net
    lat = np.random.default_rng(0).standard_normal((8, 4, 4)).astype(np.float16)
    docs = [Sample(key="i1", url="", text="ab", codes=lat), Sample(key="t1", url="", text="some words"),
            Sample(key="i2", url="", text="a cat", codes=lat), Sample(key="t2", url="", text="é more")]

    def sums(samples, caption_first=1.0):
        pc = PackingCollator(batch_size=2, seq_len=96, vocab=m.vocab, image_tokens=m.n_patches,
                             caption_first=caption_first, seed=0)
        for s in samples:
            pc.add(s)
        batch = pc.pop()
        z = batch["latents"][:, :4] if "latents" in batch else None
        t = torch.zeros(len(z), dtype=torch.long) if z is not None else None
        out = m.loss(batch, z, t, None if z is None else torch.zeros_like(z), per_token=True)
        module._bits = {}
        module._count_bits(batch, out["text_ids"], out["text_nats"])
        return {k: v.clone() for k, v in module._bits.items()}

    for first in (1.0, 0.0):  # captions before and after their image
        mixed, alone_text, alone_images = sums(docs, first), sums(docs[1::2], first), sums(docs[0::2], first)
        torch.testing.assert_close(mixed["text_bpb"], alone_text["text_bpb"])
        torch.testing.assert_close(mixed["caption_bpb"], alone_images["caption_bpb"])
        assert alone_text["caption_bpb"].sum() == 0 and alone_images["text_bpb"].sum() == 0
        assert mixed["text_bpb"][1] == len("some words") + len("é more".encode())
        assert mixed["caption_bpb"][1] == len("ab") + len("a cat")


def test_a_validation_split_of_two_sources_interleaves_them(tiny_emoji, tmp_path):
    """``data.val={images: ..., text: ...}`` (data=emoji_packed_text): the text shards hold one document
    per caption of the image split, and every validation batch holds both kinds of documents, about
    as many of each as the sources' sizes (1:1), none twice."""
    from unifuse.data.builders import caption_text_shards
    from unifuse.data.datamodule import ShardDataModule
    from unifuse.data.samples import DecodeConfig
    from unifuse.data.shards import expand_shards, shard_counts
    from unifuse.lit.transfusion import text_only_positions

    text = caption_text_shards(tmp_path / "text", tiny_emoji, "val")
    assert sum(shard_counts(expand_shards(text))) == sum(shard_counts(expand_shards(str(tiny_emoji / "val"))))
    collator = PackingCollator(batch_size=3, seq_len=128, image_tokens=16)
    dm = ShardDataModule({"x": {"shards": str(tiny_emoji / "train")}}, collator, num_workers=0,
                         val={"images": str(tiny_emoji / "val"), "text": text}, decode=DecodeConfig(image_size=16))
    seen, batches = [], 0
    for b in dm.val_dataloader():
        only_text = text_only_positions(b)
        kinds = []
        for r, doc in enumerate(b["doc_id"]):
            for d in doc[doc >= 0].unique().tolist():
                kinds.append(bool(only_text[r][doc == d].all()))
                if kinds[-1]:
                    seen.append(tuple(b["tokens"][r][doc == d].tolist()))
        batches += 1
        assert 0.25 <= sum(kinds) / len(kinds) <= 0.75, kinds
    assert batches >= 2 and len(seen) == len(set(seen))


def test_text_source_preset_composes_and_a_two_rank_run_logs_text_bpb(tiny_emoji, tiny_kl, tmp_path):
    """experiment=transfusion_emoji_text mixes the captions in as text-only documents. A tiny 2-rank
    run of data=emoji_packed_text writes them from the image shards' captions and logs val/text_bpb
    beside val/caption_bpb, reduced over both ranks."""
    import csv

    from unifuse.data.shards import shard_counts

    cfg = compose_cfg(["experiment=transfusion_emoji_text"], tmp_path / "preset")
    assert cfg.data.train.text.shards.split == "train" and cfg.data.train.text.weight == 1.0
    assert cfg.data.val.text.split == "val" and cfg.data.val.text.out == cfg.data.train.text.shards.out
    text = tmp_path / "text"
    over = [o for o in transfusion_overrides(tiny_emoji, tiny_kl) if not o.startswith("data.val=")]
    run(over + ["data=emoji_packed_text", f"data.build_dir={tiny_emoji}", f"data.train.text.shards.src={tiny_emoji}",
                f"data.train.text.shards.out={text}", "data.train.text.shards.src_build=null", "trainer=ddp",
                "trainer.devices=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=csv",
                f"paths.root_dir={tmp_path}", "callbacks.fidelity.enabled=false", "model.retrieval_images=8",
                "model.retrieval_candidates=4"], tmp_path)  # each rank holds about 11 of the 23 images
    images = sum(shard_counts([str(p) for p in (tiny_emoji / "val").glob("*.tar")]))
    assert sum(shard_counts([str(p) for p in (text / "val").glob("*.tar")])) == images  # one per caption
    rows = list(csv.DictReader(open(next((tmp_path / "outputs").rglob("metrics.csv")))))
    val = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}
    for key in ("val/caption_top1", "val/caption_top1_pmi", "val/caption_exact", "val/caption_f1"):
        assert 0 <= val[key] <= 1, key
    assert 0 < val["val/text_bpb"] < 20 and 0 < val["val/caption_bpb"] < 20
    # the text source is the image split's captions and validation reads every document of both once:
    # the same captions after the same [BOS], so the same bits per byte
    assert val["val/text_bpb"] == pytest.approx(val["val/caption_bpb"], rel=1e-5)
