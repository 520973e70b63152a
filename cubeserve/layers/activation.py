"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from cubeserve.layers.fused_kernels import silu_and_mul


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for the fused ``[gate | up]`` projection output."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)
