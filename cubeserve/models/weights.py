"""Checkpoint loading: stream safetensors tensor by tensor into a model built on its device.

Every parameter carries a ``weight_loader(param, loaded[, shard_id])`` (SGLang/vLLM
convention), so loading is one generic loop: map the checkpoint name to a parameter (and a
shard of a fused parameter), then let the parameter copy its slice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from cubeserve.server_args import LOAD_FORMATS

SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_NAMES_IN_ERROR = 20


class WeightLoadError(ValueError):
    """The checkpoint does not match the model's parameters."""


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a checkpoint tensor into a parameter (or a slice of one), converting dtype/device."""
    if param.shape != loaded.shape:
        raise WeightLoadError(
            f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


def new_parameter(*shape: int, weight_loader: Callable = default_weight_loader) -> nn.Parameter:
    """An uninitialised inference parameter that knows how to load itself from a checkpoint."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = weight_loader
    return param


@dataclass(frozen=True)
class StackedWeight:
    """Checkpoint tensors ``*.{source}.*`` load into shard ``shard_id`` of ``*.{fused}.*``."""

    fused: str
    source: str
    shard_id: int | str


def load_named_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: Sequence[StackedWeight] = (),
    skip: Callable[[str], bool] = lambda name: False,
) -> None:
    """Load checkpoint tensors into ``module``'s parameters by name.

    Raises ``WeightLoadError`` naming every checkpoint tensor a parameter still lacks and every
    tensor that matches no parameter.
    """
    params = dict(module.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, loaded in weights:
        if skip(name):
            continue
        param_name, shard_id = _param_name_and_shard(name, stacked)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        try:
            if shard_id is None:
                param.weight_loader(param, loaded)
            else:
                param.weight_loader(param, loaded, shard_id)
        except (ValueError, IndexError, RuntimeError) as err:
            raise WeightLoadError(f"cannot load checkpoint tensor {name!r}: {err}") from err
        seen.add(name)
    missing = sorted(_expected_checkpoint_names(params, stacked) - seen)
    if missing or unexpected:
        raise WeightLoadError(
            f"checkpoint does not match {type(module).__name__}: "
            f"missing tensors {_abbreviate(missing)}; unexpected tensors {_abbreviate(unexpected)}"
        )


def _param_name_and_shard(
    name: str, stacked: Sequence[StackedWeight]
) -> tuple[str, int | str | None]:
    for entry in stacked:
        if f".{entry.source}." in name:
            return name.replace(f".{entry.source}.", f".{entry.fused}."), entry.shard_id
    return name, None


def _expected_checkpoint_names(
    params: dict[str, nn.Parameter], stacked: Sequence[StackedWeight]
) -> set[str]:
    names: set[str] = set()
    for param_name in params:
        sources = [
            param_name.replace(f".{e.fused}.", f".{e.source}.")
            for e in stacked
            if f".{e.fused}." in param_name
        ]
        names.update(sources or [param_name])
    return names


def _abbreviate(names: Sequence[str]) -> str:
    if len(names) <= _MAX_NAMES_IN_ERROR:
        return str(list(names))
    return f"{list(names[:_MAX_NAMES_IN_ERROR])} and {len(names) - _MAX_NAMES_IN_ERROR} more"


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's files: the shards named by the index, else every ``*.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / file for file in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {model_dir}")
    return files


def safetensors_weights_iterator(
    model_dir: str | Path, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one CPU tensor at a time (memory-mapped, never a whole file)."""
    files = safetensors_files(model_dir)
    for file in tqdm(files, desc="Loading safetensors", unit="file", disable=not progress):
        with safe_open(file, framework="pt") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def initialize_dummy_weights(
    model: nn.Module, low: float = -1e-3, high: float = 1e-3, seed: int = 0
) -> None:
    """Small uniform values: random enough to exercise kernels, small enough for finite logits."""
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.data.uniform_(low, high, generator=generators[param.device])


def load_model(
    model_cls: type[nn.Module],
    config: PretrainedConfig,
    model_path: str | Path | None,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
) -> nn.Module:
    """Build ``model_cls(config)`` directly on ``device`` in ``dtype`` and fill its weights.

    ``load_format``: "auto"/"safetensors" read ``model_path``; "dummy" needs no files.
    Weights are streamed, so no second copy of the model is ever held in memory.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    with default_dtype(dtype), torch.device(device):
        model = model_cls(config)
    if load_format == "dummy":
        initialize_dummy_weights(model)
    else:
        if model_path is None:
            raise ValueError(f"load_format={load_format!r} needs a model_path")
        model.load_weights(safetensors_weights_iterator(model_path))
    return model.eval()
