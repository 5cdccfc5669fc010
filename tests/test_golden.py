"""Golden outputs, bit for bit: every paradigm trained for 5 optimizer steps and sampled with fixed
seeds on CPU in float32 at tiny sizes, compared with ``torch.equal`` (and ``==`` for losses and
strings) against the data recorded in ``tests/golden/``.

What is pinned, per paradigm (one producer function each, see ``PRODUCERS``):

* the training loss of each of 5 steps of a run composed from the Hydra configs and fitted by the
  Lightning Trainer through ``unifuse.train.train``, as ``python -m unifuse.train`` runs it
  (VQ-VAE, KL autoencoder, AR GPT, MaskGIT, DiT latent diffusion on both transports, Transfusion);
* the sampled codes (AR GPT, MaskGIT) and latents (DiT, Transfusion) of two prompts, with and without
  classifier-free guidance, KV-cached and recomputed where a net has both paths, several samplers;
* a greedy Transfusion caption and two-image interleaved documents (given text, and sampled text).

The runs are chained as a user's are: the AR GPT and MaskGIT train on codes of the 5-step VQ-VAE,
the DiT and Transfusion on latents of the 5-step KL autoencoder. Matrix products are summed in an
order that may depend on the thread count, so everything runs on one thread.

Recording (only on the code whose behaviour the goldens define):
``python tests/test_golden.py --record tests/golden``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # `python tests/test_golden.py --record`: import this file as `tests.test_golden`
    sys.path.insert(0, str(ROOT))

from tests.conftest import compose_cfg, generator_overrides, kl_overrides, ldm_overrides, tiny_overrides  # noqa: E402
from tests.test_transfusion import transfusion_overrides  # noqa: E402
from unifuse.data.builders import build_emoji  # noqa: E402
from unifuse.data.encode import encode_shards  # noqa: E402
from unifuse.decoding.transfusion import generate  # noqa: E402
from unifuse.train import train  # noqa: E402

try:  # the checkpoint loader lives with the run machinery; before that it sat at the package root
    from unifuse.run.checkpoint import load_pipeline
except ImportError:
    from unifuse.checkpoint import load_pipeline

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
STEPS = 5
PROMPTS = ["twemoji dog face", "openmoji pizza"]
CFG = 3.0  # the guided variants' scale
SEED = 0
LR = 0.01  # with no warmup: 5 steps move the weights enough that prompts and guidance change the samples


class LossRecorder(L.Callback):
    """Writes the loss of every training step (what ``training_step`` returned) to ``path`` as JSON
    when training ends."""

    def __init__(self, path: str):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.losses))


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Runs:
    """The tiny emoji set and the 5-step runs, each made once on first use (in a temporary directory)."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="golden_")
        self.root = Path(self._tmp.name)
        self._done: dict[str, tuple[list[float], str]] = {}
        self._emoji: Path | None = None
        self._codes: Path | None = None

    @property
    def emoji(self) -> Path:
        if self._emoji is None:  # ~160 real emoji at 16x16, as the tests' tiny_emoji fixture builds them
            self._emoji = self.root / "emoji16"
            build_emoji(self._emoji, size=16, limit=80, val_percent=20.0, shard_size=40)
        return self._emoji

    @property
    def codes(self) -> Path:
        if self._codes is None:
            self._codes = self.root / "codes"
            encode_shards(self.ckpt("vqvae"), self.emoji, self._codes, batch_size=32)
        return self._codes

    def overrides(self, kind: str) -> list[str]:
        e = self.emoji
        return {
            "vqvae": lambda: tiny_overrides(e),
            "kl": lambda: kl_overrides(e),
            "ar_gpt": lambda: generator_overrides("ar_gpt", self.codes, self.ckpt("vqvae")),
            "maskgit": lambda: generator_overrides("maskgit", self.codes, self.ckpt("vqvae")),
            "ldm": lambda: ldm_overrides(e, self.ckpt("kl")),
            "ldm_flow": lambda: ldm_overrides(e, self.ckpt("kl")) + [
                "model.net.dit.diffusion.transport=flow", "model.sampling.sampler=euler"],
            "transfusion": lambda: transfusion_overrides(e, self.ckpt("kl")),
        }[kind]()

    def run(self, kind: str) -> tuple[list[float], str]:
        """(the losses of the first STEPS steps, the run's last.ckpt) of a fresh run of ``kind``."""
        if kind not in self._done:
            out = self.root / kind
            losses = out / "losses.json"
            cfg = compose_cfg(self.overrides(kind) + [
                "trainer=cpu", f"++trainer.max_steps={STEPS}", "trainer.max_epochs=1", "logger=none",
                f"model.optimizer.lr={LR}", "model.scheduler.warmup_steps=0",
                "callbacks.images=null", "callbacks.fidelity.enabled=false",
                "++callbacks.golden_losses._target_=tests.test_golden.LossRecorder",
                f"++callbacks.golden_losses.path={losses}"], out)
            with one_thread():
                ckpt = train(cfg)["checkpoint"]
            self._done[kind] = (json.loads(losses.read_text()), ckpt)
        return self._done[kind]

    def losses(self, kind: str) -> list[float]:
        return self.run(kind)[0]

    def ckpt(self, kind: str) -> str:
        return self.run(kind)[1]

    def pipeline(self, kind: str):
        return load_pipeline(self.ckpt(kind))[0]


# ---- producers: each returns {"tensors": {name: tensor}, "values": JSON-able} -----------------------

def produce_losses(runs: Runs, kind: str) -> dict:
    losses = runs.losses(kind)
    assert len(losses) == STEPS, f"{kind}: {len(losses)} training steps ran, not {STEPS}"
    return {"tensors": {}, "values": losses}


# what each token generator returns beside its codes: the AR GPT its guided logits of every step (5
# steps of training leave guidance too weak to change many of its codes), MaskGIT each code's step
TOKEN_EXTRAS = {"ar_gpt": ("return_logits", "logits"), "maskgit": ("return_trace", "decoded_at")}


def produce_token_samples(runs: Runs, kind: str) -> dict:
    """Codes of PROMPTS from the AR GPT / MaskGIT with the stored sampling settings: unguided and
    guided, cached and recomputed."""
    pipe = runs.pipeline(kind)
    conds = pipe.conditions(PROMPTS)
    flag, extra = TOKEN_EXTRAS[kind]
    out = {}
    for cfg in (None, CFG):
        for cache in (True, False):
            s = pipe.arguments(pipe.settings(cfg_scale=cfg, seed=SEED, steps=4))
            with one_thread():
                codes, more = pipe.decode(pipe.net, conds, use_cache=cache, **s, **{flag: True})
            out[f"cfg{cfg}_cache{cache}"], out[f"cfg{cfg}_cache{cache}.{extra}"] = codes, more
    return {"tensors": out, "values": None}


LDM_SAMPLERS = {"ldm": [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpmpp_2m", 0.0)],
                "ldm_flow": [("euler", 0.0), ("heun", 0.0)]}


def produce_ldm_samples(runs: Runs, kind: str) -> dict:
    """Latents of PROMPTS from the DiT through its pipeline, per sampler (and DDIM eta), unguided and guided."""
    pipe = runs.pipeline(kind)
    out = {}
    for sampler, eta in LDM_SAMPLERS[kind]:
        for cfg in (None, CFG):
            s = pipe.settings(sampler=sampler, eta=eta, steps=4, cfg_scale=cfg, seed=SEED)
            with one_thread():
                out[f"{sampler}_eta{eta}_cfg{cfg}"] = pipe.latents(PROMPTS, s)
    return {"tensors": out, "values": None}


def produce_transfusion_samples(runs: Runs) -> dict:
    """Latents of PROMPTS from Transfusion: ddim and ddpm, unguided and guided, cached and recomputed."""
    pipe = runs.pipeline("transfusion")
    conds = pipe.conditions(PROMPTS)
    out = {}
    for sampler in ("ddim", "ddpm"):
        for cfg in (None, CFG):
            for cache in (True, False):
                s = pipe.arguments(pipe.settings(sampler=sampler, steps=3, cfg_scale=cfg, seed=SEED))
                with one_thread():
                    out[f"{sampler}_cfg{cfg}_cache{cache}"] = generate(pipe.net, conds, use_cache=cache, **s)
    return {"tensors": out, "values": None}


def produce_transfusion_caption(runs: Runs) -> dict:
    """Greedy captions (8 tokens at most) of two fixed random images in [-1, 1]."""
    pipe = runs.pipeline("transfusion")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    with one_thread():
        caps = pipe.caption(images, max_new_tokens=8)
    return {"tensors": {}, "values": caps}


def document_values(segments: list[dict]) -> tuple[dict, list]:
    """A document's segments as (image tensors by name, JSON-able segments naming them)."""
    tensors, values = {}, []
    for seg in segments:
        seg = dict(seg)
        if "image" in seg:
            name = f"image{len(tensors)}"
            tensors[name] = seg.pop("image")
            seg["image"] = name
        values.append(seg)
    return tensors, values


def produce_transfusion_document(runs: Runs) -> dict:
    """Two-image interleaved documents: given text with guided images, and unguided ones followed by
    given text and 6 sampled tokens."""
    pipe = runs.pipeline("transfusion")
    parts = [PROMPTS[0], None, PROMPTS[1], None]
    tensors, values = {}, {}
    for name, kw in (("given", {"parts": parts, "cfg_scale": CFG, "seed": SEED}),  # seed 0 samples EOS at once:
                     ("sampled", {"parts": [*parts, "twemoji"], "cfg_scale": None, "max_new_tokens": 6, "seed": 1})):
        with one_thread():
            segs = pipe.document(sampler="ddim", steps=3, **kw)
        t, values[name] = document_values(segs)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
    return {"tensors": tensors, "values": values}


PRODUCERS = {
    **{f"{k}_losses": (lambda runs, k=k: produce_losses(runs, k))
       for k in ("vqvae", "kl", "ar_gpt", "maskgit", "ldm", "ldm_flow", "transfusion")},
    "ar_gpt_samples": lambda runs: produce_token_samples(runs, "ar_gpt"),
    "maskgit_samples": lambda runs: produce_token_samples(runs, "maskgit"),
    "ldm_samples": lambda runs: produce_ldm_samples(runs, "ldm"),
    "ldm_flow_samples": lambda runs: produce_ldm_samples(runs, "ldm_flow"),
    "transfusion_samples": produce_transfusion_samples,
    "transfusion_caption": produce_transfusion_caption,
    "transfusion_document": produce_transfusion_document,
}


# ---- storage and comparison -----------------------------------------------------------------------

def save(out: dict, name: str, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if out["tensors"]:
        save_file({k: v.detach().cpu().contiguous() for k, v in out["tensors"].items()},
                  str(where / f"{name}.safetensors"))
    if out["values"] is not None:
        (where / f"{name}.json").write_text(json.dumps(out["values"], indent=1) + "\n")


def load(name: str, where: Path = GOLDEN_DIR) -> dict:
    st, js = where / f"{name}.safetensors", where / f"{name}.json"
    assert st.is_file() or js.is_file(), f"golden {name}: no recorded data in {where}"
    return {"tensors": load_file(str(st)) if st.is_file() else {},
            "values": json.loads(js.read_text()) if js.is_file() else None}


def tensor_mismatch(name: str, key: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when equal; else a message naming the golden, the tensor and its first differing entry."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"golden {name}[{key}]: got {got.dtype} {tuple(got.shape)}, recorded {want.dtype} {tuple(want.shape)}"
    if torch.equal(got, want):
        return None
    diff = (got != want) & ~(got.isnan() & want.isnan()) if got.is_floating_point() else got != want
    first = tuple(int(i) for i in diff.nonzero()[0])
    return (f"golden {name}[{key}]: {int(diff.sum())} of {got.numel()} entries differ, first at {first}: "
            f"got {got[first].item()!r}, recorded {want[first].item()!r}")


def value_mismatch(name: str, got, want, where: str = "") -> str | None:
    """None when equal (floats exactly); else the first differing place in the JSON structure."""
    if isinstance(want, dict) and isinstance(got, dict) and got.keys() == want.keys():
        return next((m for k in want if (m := value_mismatch(name, got[k], want[k], f"{where}[{k!r}]"))), None)
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        return next((m for i in range(len(want)) if (m := value_mismatch(name, got[i], want[i], f"{where}[{i}]"))),
                    None)
    return None if got == want else f"golden {name}{where}: got {got!r}, recorded {want!r}"


def mismatches(name: str, got: dict, want: dict) -> list[str]:
    out = []
    if set(got["tensors"]) != set(want["tensors"]):
        out.append(f"golden {name}: tensors {sorted(got['tensors'])}, recorded {sorted(want['tensors'])}")
    for key in sorted(set(got["tensors"]) & set(want["tensors"])):
        m = tensor_mismatch(name, key, got["tensors"][key].detach().cpu(), want["tensors"][key])
        out += [m] if m else []
    got_values = json.loads(json.dumps(got["values"]))  # as stored (tuples become lists)
    m = value_mismatch(name, got_values, want["values"])
    return out + ([m] if m else [])


@pytest.fixture(scope="module")
def runs():
    r = Runs()
    yield r
    r._tmp.cleanup()


@pytest.mark.parametrize("name", list(PRODUCERS))
def test_golden(name, runs):
    problems = mismatches(name, PRODUCERS[name](runs), load(name))
    assert not problems, "\n".join(problems)


def test_a_changed_entry_is_reported_with_its_place():
    want = {"tensors": {"x": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, "values": [0.5, "ab"]}
    got = {"tensors": {"x": torch.tensor([[1.0, 2.0], [3.0, 4.5]])}, "values": [0.5, "ac"]}
    assert mismatches("g", got, want) == ["golden g[x]: 1 of 4 entries differ, first at (1, 1): got 4.5, recorded 4.0",
                                          "golden g[1]: got 'ac', recorded 'ab'"]
    assert mismatches("g", want, want) == []


def record(where: Path, names: list[str]) -> None:
    runs = Runs()
    try:
        for name in names:
            save(PRODUCERS[name](runs), name, where)
            print(f"recorded {name}", flush=True)
    finally:
        runs._tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Record the golden outputs of this tree's code.")
    ap.add_argument("--record", type=Path, required=True, help="directory to write (tests/golden to replace them)")
    ap.add_argument("names", nargs="*", default=list(PRODUCERS), help=f"goldens (default: all): {list(PRODUCERS)}")
    args = ap.parse_args(argv)
    record(args.record, args.names)


if __name__ == "__main__":
    from tests.test_golden import main as _main  # the module Hydra's `tests.test_golden.LossRecorder` names

    _main()
