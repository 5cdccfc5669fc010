"""Evaluation: domain extractor end to end, Inception path with project-made weights, fast failure
without weights, and the offline CLI reproducing the online number."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import compose_cfg, tiny_overrides
from unifuse.eval.fidelity import EvalConfig, extractor_setup, fidelity, metric_name, reference_set


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.ones(3, 1, 3, 3) / 9
    return F.conv2d(F.pad(x.float(), (1, 1, 1, 1), mode="replicate"), k, groups=3).round().to(torch.uint8)


def test_domain_fid_self_is_zero_and_distortions_raise_it(tiny_emoji, domain_weights):
    ref, captions = reference_set(str(tiny_emoji / "train"), 64)
    assert ref.dtype == torch.uint8 and len(ref) == len(captions) == 64
    cfg = EvalConfig(extractor="domain", domain_weights=str(domain_weights), metrics=["fid", "kid", "isc"])
    same = fidelity(ref, ref, cfg)
    blurred = fidelity(blur(blur(ref)), ref, cfg)
    noisy = fidelity((ref.float() * 0.5 + 127).to(torch.uint8), ref, cfg)
    assert abs(same["fid"]) < 1e-4 and abs(same["kid"]) < 2e-3
    assert blurred["fid"] > max(1e-3, 100 * abs(same["fid"]))  # mild: 16px emoji blurred twice
    assert noisy["fid"] > 0.05 and noisy["kid"] > 10 * abs(same["kid"])  # washed-out contrast
    assert same["isc"] >= 1.0


def test_missing_inception_weights_fail_fast_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        extractor_setup(EvalConfig(extractor="inception"))
    assert time.perf_counter() - t < 5


def make_inception_weights(path: Path, monkeypatch) -> None:
    """A randomly initialised inception-v3-compat state dict, made here (nothing downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save(net.state_dict(), path)


def test_inception_path_runs_with_a_local_weights_file(tmp_path, monkeypatch, tiny_emoji):
    weights = tmp_path / "inception.pth"
    make_inception_weights(weights, monkeypatch)
    ref, _ = reference_set(str(tiny_emoji / "val"), 8)
    cfg = EvalConfig(extractor="inception", inception_weights=str(weights), metrics=["fid"], batch_size=8)
    assert extractor_setup(cfg)[0] == "inception-v3-compat"
    out = fidelity(ref, ref, cfg)
    assert abs(out["fid"]) < 1e-2
    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": object.__new__(EvalConfig)}, bad)
    with pytest.raises(ValueError, match="not a plain state dict"):
        extractor_setup(EvalConfig(extractor="inception", inception_weights=str(bad)))


def test_online_rfid_is_reproduced_by_the_evaluate_cli(tiny_emoji, domain_weights, tmp_path):
    from unifuse.evaluate import main as evaluate_main
    from unifuse.train import train

    over = tiny_overrides(tiny_emoji) + ["trainer=debug_limit", "trainer.max_epochs=1", "logger=csv",
                                         f"eval.domain_weights={domain_weights}"]
    result = train(compose_cfg(over, tmp_path))
    online = {k: v for k, v in result["metrics"].items() if k.startswith("eval/rfid@domain-")}
    assert len(online) == 1, result["metrics"]
    (name, value), = online.items()
    assert "-n" in name and result["metrics"]["eval/psnr"] > 0
    res = evaluate_main([f"ckpt={result['checkpoint']}"])
    assert res["metric_names"]["rfid"] == name
    assert res["metrics"]["rfid"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    stored = json.loads(Path(res["json"]).read_text())
    assert stored["protocol"]["n"] == len(reference_set(str(tiny_emoji / "val"), 32)[0])
    assert stored["protocol"]["feature_extractor"].startswith("domain-")
    # callbacks.ema is on by default: online and offline both evaluate the average
    assert stored["protocol"]["weights"] == "ema" and stored["protocol"]["task"] == "reconstruction"
    # a different protocol gets a different name: numbers from different n cannot be confused
    other = evaluate_main([f"ckpt={result['checkpoint']}", "n=8"])
    assert other["metric_names"]["rfid"] != name and other["protocol"]["n"] == 8


def test_metric_names_carry_the_protocol():
    p = {"feature_extractor": "inception-v3-compat", "n": 10000, "cfg_scale": 3.0, "steps": 8}
    assert metric_name("fid", p) == "eval/fid@inception-v3-compat-n10000-cfg3.0-steps8"


def test_domain_extractor_files_of_other_widths_load(tmp_path):
    from unifuse.eval.extractors import DomainNet, load_domain_net
    net = DomainNet(5, width=32, feature_dim=64)
    path = tmp_path / "old.pt"
    torch.save({"state_dict": net.state_dict(), "classes": list("abcde")}, path)  # no arch entry
    loaded, _ = load_domain_net(path)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(loaded(x), net.eval()(x))


def test_domain_extractor_is_the_same_file_in_any_checkout(tiny_emoji, domain_weights, tmp_path):
    """Built from the same data in another directory, the extractor is byte-identical, so its hash
    (part of every FID metric name) compares runs across clones and machines."""
    import shutil

    from unifuse.eval.extractors import file_hash, train_domain_extractor

    other = tmp_path / "elsewhere" / tiny_emoji.name
    shutil.copytree(tiny_emoji / "train", other / "train")
    info = train_domain_extractor(str(other / "train"), other / "domain_extractor.pt", epochs=6)
    assert info["hash"] == file_hash(domain_weights)
