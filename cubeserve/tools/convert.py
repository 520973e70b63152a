"""``cubeserve convert SRC DST``: original Quicksviewer checkpoint -> cubeserve checkpoint.

The output directory holds a ``config.json`` with ``model_type: quicksviewer`` (nested vision/text configs and the
multimodal special-token ids), safetensors with cubeserve weight names (LM names unchanged, vision weights renamed,
unused SigLIP post_layernorm/head dropped, dtypes as stored), the tokenizer files and generation_config.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cubeserve.configs.quicksviewer import config_from_original
from cubeserve.models.quicksviewer_vision import is_unused_vision_weight, original_to_cubeserve_name

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


def source_weight_files(src_dir: Path) -> list[Path]:
    index = src_dir / INDEX_FILE
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [src_dir / name for name in names]
    files = sorted(src_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {src_dir}")
    return files


def iter_converted_tensors(src_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (cubeserve name, tensor) one tensor at a time, dropping weights that are never used."""
    seen: set[str] = set()
    for path in source_weight_files(src_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if is_unused_vision_weight(name):
                    continue
                new_name = original_to_cubeserve_name(name)
                if new_name in seen:
                    raise ValueError(f"duplicate weight {new_name!r} (from {name!r} in {path.name})")
                seen.add(new_name)
                yield new_name, f.get_tensor(name)


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], dst_dir: Path, max_shard_bytes: int) -> list[Path]:
    """Write tensors to safetensors shards of at most ~max_shard_bytes, holding one shard in memory at a time."""
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = dst_dir / f"shard-{len(shards):05d}.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        shards.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total_bytes += size
    if pending or not shards:
        flush()

    if len(shards) == 1:
        final = dst_dir / SINGLE_FILE
        shards[0][0].replace(final)
        return [final]
    weight_map: dict[str, str] = {}
    finals: list[Path] = []
    for i, (path, names) in enumerate(shards, start=1):
        final = dst_dir / _shard_name(i, len(shards))
        path.replace(final)
        finals.append(final)
        weight_map.update({name: final.name for name in names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    with open(dst_dir / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return finals


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
    # The multimodal preprocessor reads the pixel settings from the config; this copy is for HF tooling.
    with open(src_dir / "config.json", encoding="utf-8") as f:
        tower = json.load(f).get("mm_vision_tower", "")
    preprocessor = (src_dir / tower / "preprocessor_config.json") if tower else None
    if preprocessor is not None and preprocessor.is_file():
        shutil.copyfile(preprocessor, dst_dir / "preprocessor_config.json")


def convert(src_dir: str | Path, dst_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert an ORIGINAL-format checkpoint in ``src_dir`` into a cubeserve checkpoint in ``dst_dir``."""
    src, dst = Path(src_dir), Path(dst_dir)
    if src.resolve() == dst.resolve():
        raise ValueError("source and destination must differ")
    config = config_from_original(src)  # validates the checkpoint before anything is written
    dst.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(dst / "config.json"), use_diff=False)
    write_sharded(iter_converted_tensors(src), dst, max_shard_bytes)
    copy_side_files(src, dst)
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cubeserve convert", description="Convert an original Quicksviewer checkpoint to cubeserve format."
    )
    parser.add_argument("src", help="original checkpoint directory (config.json with model_type quicksviewer_*)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument(
        "--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3, help="maximum safetensors shard size"
    )
    args = parser.parse_args(argv)
    out = convert(args.src, args.dst, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
