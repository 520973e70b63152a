"""Imports every built-in backend so each registers its name."""

import importlib.util

from cubeserve.attention import torch_backend  # noqa: F401

if importlib.util.find_spec("triton") is not None:
    from cubeserve.attention import triton_backend  # noqa: F401
