"""CPU attention-kernel figures behind ``unifuse.models.attention.CPU_BF16_MATH_BELOW``:

1. SDPA forward+backward with a boolean mask, 3 heads of 64: the default (flash) kernel against the
   math kernel, bf16 and fp32, at several key lengths (same run, ratios).
2. A training step of the `make train` Transfusion backbone shape (width 192, 6 layers, 3 heads,
   32 rows of 44 positions, packed-document + image-block mask, bf16 autocast): SDPA's default
   kernel everywhere against ``attend``'s rule (math below the threshold), interleaved.

    python experiments/bench/attention.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from unifuse.models import attention
from unifuse.models.transformer import Transformer, TransformerConfig


def per_call_ms(fn, n: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def kernels(n: int) -> None:
    print("1. SDPA forward+backward, masked, 3 heads x 64: flash (default) vs math")
    for length, batch in [(44, 32), (88, 12), (128, 16), (256, 8), (512, 4)]:
        mask = torch.rand(batch, 1, length, length) > 0.3
        mask |= torch.eye(length, dtype=torch.bool)
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(batch, 3, length, 64, dtype=dtype, requires_grad=True) for _ in range(3))

            def step(backend):
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

            flash = per_call_ms(lambda: step(SDPBackend.FLASH_ATTENTION), n)
            math_ = per_call_ms(lambda: step(SDPBackend.MATH), n)
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            print(f"   keys {length:4d} x {batch:2d} rows {name}: flash {flash:6.2f} ms  math {math_:6.2f} ms  "
                  f"flash/math {flash / math_:.2f}")
    print(f"   rule: CPU bf16 below {attention.CPU_BF16_MATH_BELOW} keys runs math")


def training_step(n: int) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=2056, dim=192, n_layers=6, n_heads=3, qk_norm=True)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, length = 32, 44
    tokens = torch.randint(0, cfg.vocab_size, (b, length))
    doc_id = torch.zeros(b, length, dtype=torch.long)
    doc_id[:, 30:] = 1  # two documents in some rows' worth of positions
    image_id = torch.full((b, length), -1, dtype=torch.long)
    image_id[:, 10:26] = 0  # one 16-position image block

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens, doc_id=doc_id, image_id=image_id)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rule = attention.CPU_BF16_MATH_BELOW
    times = {"default": [], "rule": []}
    for _ in range(3):  # interleaved: a noisy machine slows both alike
        for name, below in (("default", 0), ("rule", rule)):
            attention.CPU_BF16_MATH_BELOW = below
            times[name].append(per_call_ms(step, n))
    attention.CPU_BF16_MATH_BELOW = rule
    d, r = min(times["default"]), min(times["rule"])
    print("2. training step, width 192 x 6 layers, 32 x 44 positions, bf16 autocast (best of 3)")
    print(f"   SDPA default kernel {d:.1f} ms  attend's rule {r:.1f} ms  speedup {d / r:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    kernels(5 if args.quick else 20)
    training_step(3 if args.quick else 15)


if __name__ == "__main__":
    main()
