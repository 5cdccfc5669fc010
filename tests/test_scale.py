"""Scale: the memory plan against the built model and the tensors autograd keeps, the H100 presets
against 80 GB, trainer=fsdp composed and run with 2 CPU processes (against DDP, resumed and sampled
from its shards), sharded checkpoints read in one process, and regional torch.compile."""

from __future__ import annotations

import copy
import csv
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from tests.conftest import compose_cfg, tiny_data_overrides
from tests.test_distributed import run
from unifuse.models import attention
from unifuse.models.transformer import Block, Transformer, TransformerConfig
from unifuse.run.memory_plan import activation_bytes, activation_mode, plan_from_config

TIMEOUT = 600  # per training subprocess: generous, the machine may be busy; a hung run still fails
PRESETS = ["transfusion_0.16b_h100", "transfusion_0.37b_h100", "transfusion_0.76b_h100", "transfusion_1.4b_h100",
           "transfusion_7b_h100"]


def tiny_transfusion(data_dir: Path) -> list[str]:
    """Transfusion on raw 16x16 pixels (no autoencoder file), 2 layers of width 32."""
    return ["model=transfusion", "autoencoder=identity", *tiny_data_overrides(data_dir),
            "data.collator.image_tokens=16", "data.collator.seq_len=64", "data.collator.batch_size=4",
            "model.net.transformer.dim=32", "model.net.transformer.n_layers=2", "model.net.transformer.n_heads=2",
            "model.sampling.steps=2", "model.retrieval_images=0", "model.sample_prompts=[twemoji dog face]"]


# ----------------------------------------------------------------------------- the plan's numbers
def test_plan_counts_the_built_model_and_fsdp_divides_the_sharded_parts(tiny_emoji, tmp_path):
    over = tiny_transfusion(tiny_emoji) + ["model.net.transformer.dim=48", "model.net.transformer.n_heads=4"]
    cfg = compose_cfg(over + ["trainer=ddp", "trainer.devices=4"], tmp_path)
    built = instantiate(cfg.model.net)
    ddp = plan_from_config(cfg)
    assert ddp.params == sum(p.numel() for p in built.parameters()) > 0
    fsdp = plan_from_config(compose_cfg(over + ["trainer=fsdp", "callbacks=fsdp", "trainer.devices=4"], tmp_path))
    assert fsdp.params == ddp.params and fsdp.title.startswith("FSDP over 4 ranks")
    for part in ("weights", "gradients", "optimizer state"):
        assert fsdp.parts[part][0] == pytest.approx(ddp.parts[part][0] / 4), part
    assert "DDP buckets" in ddp.parts and "DDP buckets" not in fsdp.parts and "gathered units" in fsdp.parts
    assert "EMA" in ddp.parts and "EMA" not in fsdp.parts  # callbacks=fsdp drops the EMA copy
    assert ddp.parts["activations"][0] == fsdp.parts["activations"][0]  # same micro-batch per GPU


def _saved_bytes_per_token(model: Transformer, precision: str, seq_len: int = 64) -> float:
    """Bytes autograd keeps per token for a forward + next-token loss: the difference between
    batches of 4 and 2 rows (parameters and their casts are the same in both and cancel)."""

    def saved(rows: int) -> int:
        tokens = torch.randint(0, model.cfg.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(rows))
        seen: dict = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "32-true"):
            logits = model(tokens)
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        return sum(seen.values())

    return (saved(4) - saved(2)) / (2 * seq_len)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision,bf16_weights", [("32-true", False), ("bf16-mixed", False), ("bf16-mixed", True)])
def test_activation_estimate_matches_what_autograd_keeps(precision, bf16_weights, checkpointing, monkeypatch):
    """The per-layer formula and the LM head term against the saved tensors of a real forward (a
    small model with grouped-query attention; the width dominates, as at scale). The plan is for GPUs,
    whose attention kernels keep no score matrix: the CPU's short-sequence bf16 math kernel (which
    keeps one) is switched off here."""
    monkeypatch.setattr(attention, "CPU_BF16_MATH_BELOW", 0)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=300, dim=128, n_layers=3, n_heads=8, n_kv_heads=4, qk_norm=True,
                            grad_checkpointing=checkpointing)
    model = Transformer(cfg).train()
    if bf16_weights:
        model = model.to(torch.bfloat16)
    measured = _saved_bytes_per_token(model, precision)
    act = activation_bytes(cfg, 1, activation_mode(precision, bf16_weights), checkpointing)
    assert measured == pytest.approx(act["blocks"] + act["head"], rel=0.06)


def test_h100_presets_compose_and_fit_80gb_per_gpu(tmp_path):
    sizes = []
    for name in PRESETS:
        plan = plan_from_config(compose_cfg([f"experiment={name}"], tmp_path))
        assert plan.device_bytes == 80e9 and plan.fits, f"{name}:\n{plan.table()}"
        assert plan.title.startswith(("DDP over 8 ranks", "FSDP over 8 ranks")) and "bf16-mixed" in plan.title
        sizes.append(plan.params)
    assert sizes == sorted(sizes) and sizes[-1] > 6e9
    assert plan.title.startswith("FSDP")  # 7B: an AdamW replica (16 B x 6.5B) would not fit one GPU
    replica = 16 * plan.params
    assert replica > 80e9 and plan.parts["weights"][0] == pytest.approx(4 * plan.params / 8)


# ----------------------------------------------------------------------------- trainer=fsdp
def test_fsdp_preset_builds_the_strategy_and_refuses_rank_zero_callbacks(tiny_emoji, tmp_path):
    from unifuse.run.parallel import FSDP2Strategy, check_callbacks

    cfg = compose_cfg(tiny_transfusion(tiny_emoji) + ["trainer=fsdp"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy.wrap == (Block,)
    assert strategy._save_distributed_checkpoint and strategy.reshard_after_forward
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    with pytest.raises(ValueError, match="callbacks=fsdp") as err:
        check_callbacks(callbacks)
    assert all(f"callbacks.{name} (" in str(err.value) for name in ("ema", "images", "fidelity"))
    cfg = compose_cfg(tiny_transfusion(tiny_emoji) + ["trainer=fsdp", "callbacks=fsdp"], tmp_path)
    check_callbacks([instantiate(c) for c in cfg.callbacks.values() if c is not None])
    assert cfg.callbacks.last_checkpoint is not None and cfg.callbacks.memory_plan is not None


def _losses(run_dir: Path) -> list[float]:
    """train/loss of every step, over the run's CSV logs (one per start of the run) in order."""
    out = []
    for f in sorted(run_dir.rglob("metrics.csv")):
        out += [float(r["train/loss"]) for r in csv.DictReader(open(f)) if r.get("train/loss")]
    return out


def test_fsdp_two_cpu_processes_match_ddp_resume_from_shards_and_sample_them(tiny_emoji, tmp_path):
    """4 steps on 2 ranks (activation checkpointing on): DDP in one go; FSDP stopped after 2 steps
    and resumed from its sharded last.ckpt with ckpt_path=last. The losses agree step by step; FSDP
    writes one shard per rank, prints the memory plan, and the sampling CLI reads the shards back
    into the whole model."""
    from PIL import Image

    from unifuse.run.checkpoint import read_checkpoint
    from unifuse.sample import main as sample_main

    common = tiny_transfusion(tiny_emoji) + [
        "logger=csv", "trainer.devices=2", "trainer.max_epochs=-1", "data.batches_per_epoch=2",
        "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "model.net.transformer.grad_checkpointing=true",
        "callbacks=fsdp", "callbacks.memory_plan.device_memory_gb=80",
        "model.scheduler=null", "model.optimizer.lr=0.01"]  # steps large enough to tell the gradients apart
    run(common + ["trainer=ddp", f"hydra.run.dir={tmp_path / 'ddp'}", "+trainer.max_steps=4"], tmp_path,
        timeout=TIMEOUT)
    run_dir = tmp_path / "fsdp"
    fsdp = common + ["trainer=fsdp", f"hydra.run.dir={run_dir}"]
    proc = run(fsdp + ["+trainer.max_steps=2"], tmp_path, timeout=TIMEOUT)
    assert "memory plan per GPU: FSDP over 2 ranks" in proc.stdout + proc.stderr
    run(fsdp + ["+trainer.max_steps=4", "ckpt_path=last"], tmp_path, timeout=TIMEOUT)
    ddp = _losses(tmp_path / "ddp")
    assert len(ddp) == 4 and _losses(run_dir) == pytest.approx(ddp, rel=1e-4)
    shards = run_dir / "checkpoints" / "last.ckpt"
    assert shards.is_dir() and sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(shards.parent.glob(".*"))  # no partial or old directory left behind
    ck = read_checkpoint(shards)
    assert ck.kind == "transfusion" and ck.step == 4
    # the zero-initialised patch head has trained in every row: both ranks' halves are in the weights
    assert bool((ck.state_dict["patch_out.weight"].abs().sum(1) > 0).all())
    out = sample_main([f"ckpt={shards}", "prompt=twemoji dog face", "n=2", "steps=2"])
    assert out.parent == run_dir / "samples" and Image.open(out).size[0] > 0


# ----------------------------------------------------------------------------- sharded checkpoints
def _write_sharded(path: Path, state: dict, meta: dict) -> None:
    from torch.distributed.checkpoint import save

    save({"state_dict": state, "optimizer_0": {"state": {"m": torch.ones(3)}}}, checkpoint_id=path, no_dist=True)
    torch.save(meta, path / "meta.pt")


def test_a_sharded_checkpoint_reads_back_in_one_process_and_its_index_cannot_run_code(tmp_path):
    from unifuse.models.transfusion import Transfusion, TransfusionConfig
    from unifuse.run.checkpoint import load_net, read_checkpoint
    from unifuse.sample import default_out

    torch.manual_seed(0)
    net = Transfusion(TransformerConfig(dim=32, n_layers=2, n_heads=2), TransfusionConfig(latent_size=4))
    state = {f"net.{k}": v + torch.randn_like(v) for k, v in net.state_dict().items()}
    meta = {"unifuse": {"kind": "transfusion", "config": net.config()}, "global_step": 7, "epoch": 1}
    shards = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _write_sharded(shards, state, meta)
    ck = read_checkpoint(shards)
    assert ck.step == 7 and sorted(ck.state_dict) == sorted(k[4:] for k in state)
    for k, v in state.items():
        assert torch.equal(ck.state_dict[k[4:]], v), k
    assert torch.equal(load_net(ck).net.tok_emb.weight, state["net.net.tok_emb.weight"])
    assert default_out(shards, "transfusion", ["a b"], 0).parent == tmp_path / "run" / "samples"  # not in the shards

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('ran')",))

    (shards / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="not part of a torch.distributed.checkpoint index"):
        read_checkpoint(shards)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_blocks_train_like_eager_and_sampling_stays_eager():
    from torch._dynamo.utils import counters

    from tests.test_transfusion import random_batch, tiny_model
    from unifuse.decoding.transfusion import generate
    from unifuse.run.parallel import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    m, ref = tiny_model().train(), tiny_model().train()
    assert compile_blocks(m, backend="eager") == 2 and list(m.state_dict()) == list(ref.state_dict())
    batch = random_batch(m, 0, rows=2)
    z = torch.randn(len(batch["image_pos"]), 4, 4, 4)
    t, eps = torch.rand(len(z)), torch.randn_like(z)
    loss = m.loss(batch, z, t, eps)["loss"]
    loss.backward()
    assert loss.item() == pytest.approx(ref.loss(batch, z, t, eps)["loss"].item(), rel=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 2  # one Block graph shared by every layer (and the first layer's mask build)
    m.eval()
    with torch.inference_mode():
        generate(m, ["ab", "abab"], steps=2)  # a KV cache growing by a position per step: eager, no compiles
    assert counters["stats"]["unique_graphs"] == graphs
    twin = copy.deepcopy(m)  # e.g. the EMA copy: its blocks run their own weights
    assert twin.net.layers[0].forward.__self__ is twin.net.layers[0]


def test_compile_switch_compiles_the_blocks_of_a_training_run(tiny_emoji, tmp_path):
    from torch._dynamo.utils import counters

    from unifuse.train import train

    torch._dynamo.reset()
    counters.clear()
    cfg = compose_cfg(tiny_transfusion(tiny_emoji) + ["compile.enabled=true", "compile.backend=eager",
                                                      "trainer=debug_limit", "trainer.max_epochs=1", "logger=none",
                                                      "callbacks.fidelity.enabled=false"], tmp_path)
    r = train(cfg)
    assert counters["stats"]["unique_graphs"] >= 1  # the Blocks ran compiled
    assert r["checkpoint"] and r["images"]  # and the run validated and sampled its grid (eagerly)
