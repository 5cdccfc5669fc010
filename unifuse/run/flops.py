"""FLOPs of a forward pass as it runs, counted by torch's ``FlopCounterMode``: the reference the
modules' analytic ``flops_per_batch`` counts are held to, and the counter for networks whose count
is not worth writing out (convolutions).

A module's ``flops_per_batch(batch)`` (what the MFU gauge divides by) is the training FLOPs of the
trained network on that batch: 3x its forward (the backward costs about two forwards), counting
every position it runs (packing padding included), attention over all (query, key) pairs, and not
the frozen tokenizer or autoencoder that prepares the batch.

``FlopCounterMode`` counts the matrix products (mm, bmm, convolutions, attention kernels), a
multiply-add as 2 FLOPs; elementwise work, norms and softmax are not counted. It knows the
attention kernels of GPUs (flash, memory-efficient, cuDNN) and FlexAttention, but not the CPU
kernel that ``scaled_dot_product_attention`` dispatches to on CPU (with or without a mask), which
it would count as zero: :data:`CPU_ATTENTION` adds torch's own attention formula for it. Attention
is counted over every (query, key) pair whatever the mask (causal, document or padding), as the
dense and flash kernels compute it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                 _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def count_forward(module: Callable, *inputs, **kwargs) -> FlopCounterMode:
    """The counter after one call ``module(*inputs, **kwargs)`` (a network, or e.g. its loss on a
    batch), run without autograd in the module's current mode: ``get_flop_counts()`` splits the
    total by module and operator."""
    counter = flop_counter()
    with counter, torch.no_grad():
        module(*inputs, **kwargs)
    return counter


def forward_flops(module: Callable, *inputs, **kwargs) -> float:
    """FLOPs of one forward ``module(*inputs, **kwargs)`` (see :func:`count_forward`)."""
    return float(count_forward(module, *inputs, **kwargs).get_total_flops())
