"""Configuration of the Quicksviewer multimodal model.

Two on-disk formats are supported:

* the ORIGINAL Quicksviewer checkpoint (``model_type`` ``quicksviewer_qwen`` / ``quicksviewer_llama``): a flat
  LM config with ``mm_*`` fields, the SigLIP tower config in a side folder named by ``mm_vision_tower`` and the
  multimodal special tokens only in the tokenizer;
* the cubeserve format written by ``cubeserve convert`` (``model_type`` ``quicksviewer``): everything in one
  ``config.json`` with nested ``vision_config`` / ``text_config``.

``load_quicksviewer_config`` accepts both.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig, SiglipVisionConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Placeholder id the original uses for every `<image>` marker in `input_ids`.
IMAGE_TOKEN_INDEX = -200

ORIGINAL_MODEL_TYPES: dict[str, str] = {
    "quicksviewer_qwen": "qwen2",
    "quicksviewer_llama": "llama",
}
ORIGINAL_ARCHITECTURES: dict[str, str] = {
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaLlamaForCausalLM": "llama",
}
TEXT_ARCHITECTURES: dict[str, str] = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
CONV_TEMPLATES: dict[str, str] = {"qwen2": "qwen2", "llama": "llama_3_chat"}
DEFAULT_TEXT_MODEL_TYPE = "qwen2"

# (config field, token text, enabling flag) for every multimodal special token.
MM_SPECIAL_TOKENS: tuple[tuple[str, str, str], ...] = (
    ("patch_start_token_id", "<patch_start>", "mm_use_patch_start_end"),
    ("patch_end_token_id", "<patch_end>", "mm_use_patch_start_end"),
    ("video_start_token_id", "<video_start>", "mm_use_video_start_end"),
    ("video_end_token_id", "<video_end>", "mm_use_video_start_end"),
    ("im_start_token_id", "<im_start>", "mm_use_im_start_end"),
    ("im_end_token_id", "<im_end>", "mm_use_im_start_end"),
    ("thumbnail_start_token_id", "<thumbnail_start>", "mm_use_thumbnail_start_end"),
    ("thumbnail_end_token_id", "<thumbnail_end>", "mm_use_thumbnail_start_end"),
)

# Original config keys that are never forwarded to the text config (set explicitly instead).
_NOT_FORWARDED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
    }
)
# Keys every LM config understands whether or not its class declares them (transformers 4.x takes most of them
# through the base `PretrainedConfig.__init__` kwargs, 5.x declares them as dataclass fields).
_COMMON_TEXT_KEYS = frozenset(
    {
        "rope_theta",
        "rope_scaling",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
        "output_hidden_states",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
    }
)
# Keys of a serialised sub-config that are class facts or bookkeeping, not constructor arguments.
_SUBCONFIG_DROPPED_KEYS = ("model_type", "transformers_version")

# transformers >= 4.56 stores the weights dtype as `dtype` (`torch_dtype` is a deprecated alias property);
# older versions only know `torch_dtype`. Configs are built with whichever name the installed version stores.
_DTYPE_KEY = (
    "dtype" if isinstance(inspect.getattr_static(PretrainedConfig, "torch_dtype", None), property) else "torch_dtype"
)


def _normalize_dtype_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Accept `dtype` and/or `torch_dtype` (`dtype` wins) and pass it on under the installed version's name."""
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if dtype is None:
        dtype = torch_dtype
    if dtype is not None:
        kwargs[_DTYPE_KEY] = dtype
    return kwargs


def _subconfig_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in raw.items() if k not in _SUBCONFIG_DROPPED_KEYS}
    return _normalize_dtype_kwargs(kwargs)


def _build_vision_config(value: Any) -> PretrainedConfig:
    if value is None:
        return SiglipVisionConfig()
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        return SiglipVisionConfig(**_subconfig_kwargs(value))
    raise TypeError(f"vision_config must be a dict, a PretrainedConfig or None, got {type(value).__name__}")


def _build_text_config(value: Any) -> PretrainedConfig:
    if value is None:
        return CONFIG_MAPPING[DEFAULT_TEXT_MODEL_TYPE]()
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        model_type = value.get("model_type") or DEFAULT_TEXT_MODEL_TYPE
        return CONFIG_MAPPING[model_type](**_subconfig_kwargs(value))
    raise TypeError(f"text_config must be a dict, a PretrainedConfig or None, got {type(value).__name__}")


class QuicksviewerConfig(PretrainedConfig):
    """Quicksviewer = SigLIP tower + momentum cubing + 3D perceiver resampler + Qwen2/Llama LM.

    Written in the classic explicit-``__init__`` style so that it works on every transformers version from 4.44
    on (5.x turns config classes into dataclasses but keeps honouring a subclass' own ``__init__``).
    """

    model_type = "quicksviewer"
    sub_configs: ClassVar[dict[str, type]] = {"vision_config": SiglipVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        # Pixel preprocessing (from the tower's preprocessor_config.json).
        image_size: int = 384,
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1.0 / 255.0,
        image_aspect_ratio: str = "anyres",
        image_grid_pinpoints: list[list[int]] | str | None = None,
        # Resampler / cubing / thumbnail.
        num_queries: int = 64,
        resampler_num_heads: int = 8,
        mm_use_thumbnail: bool = True,
        mm_use_thumbnail_start_end: bool = True,
        mm_use_video_start_end: bool = True,
        mm_use_im_start_end: bool = True,
        mm_use_patch_start_end: bool = True,
        # Default video sampling when a request does not say otherwise.
        video_num_frames: int = 420,
        video_fps: float = 1.0,
        conv_template: str = "qwen2",
        original_model_type: str | None = None,
        # Special tokens. `image_token_id` is the placeholder id of one visual block in `input_ids`.
        image_token_id: int = IMAGE_TOKEN_INDEX,
        video_start_token_id: int | None = None,
        video_end_token_id: int | None = None,
        thumbnail_start_token_id: int | None = None,
        thumbnail_end_token_id: int | None = None,
        patch_start_token_id: int | None = None,
        patch_end_token_id: int | None = None,
        im_start_token_id: int | None = None,
        im_end_token_id: int | None = None,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        # Sub-configs first: the base initialiser (5.x) propagates the attention implementation into them.
        self.vision_config = _build_vision_config(vision_config)
        self.text_config = _build_text_config(text_config)

        self.image_size = image_size
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.rescale_factor = rescale_factor
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = parse_grid_pinpoints(image_grid_pinpoints)

        self.num_queries = num_queries
        self.resampler_num_heads = resampler_num_heads
        self.mm_use_thumbnail = mm_use_thumbnail
        self.mm_use_thumbnail_start_end = mm_use_thumbnail_start_end
        self.mm_use_video_start_end = mm_use_video_start_end
        self.mm_use_im_start_end = mm_use_im_start_end
        self.mm_use_patch_start_end = mm_use_patch_start_end

        self.video_num_frames = video_num_frames
        self.video_fps = video_fps
        self.conv_template = conv_template
        self.original_model_type = original_model_type

        self.image_token_id = image_token_id
        self.video_start_token_id = video_start_token_id
        self.video_end_token_id = video_end_token_id
        self.thumbnail_start_token_id = thumbnail_start_token_id
        self.thumbnail_end_token_id = thumbnail_end_token_id
        self.patch_start_token_id = patch_start_token_id
        self.patch_end_token_id = patch_end_token_id
        self.im_start_token_id = im_start_token_id
        self.im_end_token_id = im_end_token_id

        # The derived widths are not stored: a stray top-level copy must agree with the sub-config.
        for key, sub in (("hidden_size", self.text_config), ("vision_hidden_size", self.vision_config)):
            if key in kwargs:
                value = kwargs.pop(key)
                if value is not None and value != sub.hidden_size:
                    raise ValueError(f"{key}={value} disagrees with the nested config's hidden_size={sub.hidden_size}")

        _normalize_dtype_kwargs(kwargs)
        # transformers 4.x resets these in `PretrainedConfig.__init__` unless they are passed along; 5.x just stores
        # them, so passing them through is right for both.
        super().__init__(
            bos_token_id=bos_token_id,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def hidden_size(self) -> int:
        """LM hidden size, which is also the width of every visual feature block."""
        return self.text_config.hidden_size

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        # Writable for transformers code that assigns `config.hidden_size` (e.g. `from_pretrained(..., hidden_size=)`):
        # it is an alias of the LM's width, never a separate attribute.
        self.text_config.hidden_size = value

    @property
    def vision_hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @vision_hidden_size.setter
    def vision_hidden_size(self, value: int) -> None:
        self.vision_config.hidden_size = value

    if _DTYPE_KEY == "torch_dtype":  # transformers < 4.56 has no `dtype`; offer it as an alias of `torch_dtype`

        @property
        def dtype(self) -> Any:
            return self.torch_dtype

        @dtype.setter
        def dtype(self, value: Any) -> None:
            self.torch_dtype = value

    if not hasattr(PretrainedConfig, "get_text_config"):  # transformers < 4.45

        def get_text_config(self, decoder: bool = False) -> PretrainedConfig:
            return self.text_config

    def to_dict(self) -> dict[str, Any]:
        """Like `PretrainedConfig.to_dict`, with the nested configs always serialised as plain dicts."""
        output = super().to_dict()
        for key in self.sub_configs:
            if not isinstance(output.get(key), dict):
                value = getattr(self, key, None)
                if isinstance(value, PretrainedConfig):
                    nested = value.to_dict()
                    nested.pop("transformers_version", None)
                    output[key] = nested
        return output

    @classmethod
    def from_original(cls, model_dir: str | Path) -> QuicksviewerConfig:
        return config_from_original(model_dir)


def parse_grid_pinpoints(value: Any) -> list[list[int]] | None:
    """Normalise `image_grid_pinpoints` (a Python-literal string or a JSON list) to `[[w, h], ...]`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return [[int(w), int(h)] for w, h in value]


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _text_backbone(raw: dict[str, Any]) -> str:
    backbone = ORIGINAL_MODEL_TYPES.get(raw.get("model_type", ""))
    if backbone is None:
        for arch in raw.get("architectures") or []:
            backbone = ORIGINAL_ARCHITECTURES.get(arch)
            if backbone is not None:
                break
    if backbone is None:
        raise ValueError(
            f"not an original Quicksviewer checkpoint: model_type={raw.get('model_type')!r}, "
            f"architectures={raw.get('architectures')!r}"
        )
    return backbone


def _text_config_keys(config_cls: type[PretrainedConfig]) -> set[str]:
    """Constructor keys of an LM config class: dataclass fields (transformers 5.x) and/or `__init__` parameters."""
    keys = set(_COMMON_TEXT_KEYS)
    if dataclasses.is_dataclass(config_cls):
        keys.update(f.name for f in dataclasses.fields(config_cls))
    for name, param in inspect.signature(config_cls.__init__).parameters.items():
        if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            keys.add(name)
    return keys


def _text_config_from_original(raw: dict[str, Any], backbone: str) -> PretrainedConfig:
    config_cls = CONFIG_MAPPING[backbone]
    # Only forward the keys the LM config knows, so the mm_* fields do not leak into it.
    known = _text_config_keys(config_cls)
    kwargs = {k: v for k, v in raw.items() if k in known and k not in _NOT_FORWARDED_KEYS}
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    if dtype is not None:
        kwargs[_DTYPE_KEY] = dtype
    kwargs["architectures"] = [TEXT_ARCHITECTURES[backbone]]
    return config_cls(**kwargs)


def _resolve_tower_dir(model_dir: Path, tower: str | None) -> Path:
    if not tower:
        raise ValueError(f"{model_dir}/config.json has no mm_vision_tower")
    candidate = Path(tower)
    if not candidate.is_absolute():
        candidate = model_dir / candidate
    if not (candidate / "config.json").is_file():
        raise FileNotFoundError(
            f"vision tower config not found: {candidate / 'config.json'} (mm_vision_tower={tower!r}, "
            f"resolved relative to {model_dir})"
        )
    return candidate


def _vision_config_from_dir(tower_dir: Path) -> SiglipVisionConfig:
    raw = _read_json(tower_dir / "config.json")
    if "vision_config" in raw:  # a full SiglipConfig folder
        raw = raw["vision_config"]
    kwargs = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "transformers_version")}
    return SiglipVisionConfig(**kwargs)


def _preprocessor_fields(tower_dir: Path, vision_config: SiglipVisionConfig) -> dict[str, Any]:
    path = tower_dir / "preprocessor_config.json"
    if not path.is_file():
        return {"image_size": int(vision_config.image_size)}
    pre = _read_json(path)
    size = pre.get("size", vision_config.image_size)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", vision_config.image_size))
    fields: dict[str, Any] = {"image_size": int(size)}
    for key in ("image_mean", "image_std", "rescale_factor"):
        if key in pre:
            fields[key] = pre[key]
    return fields


def lookup_token_ids(model_dir: str | Path, tokens: list[str]) -> dict[str, int | None]:
    """Ids of `tokens` in the tokenizer stored in `model_dir` (None for a token that is not in it)."""
    model_dir = Path(model_dir)
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json))
        return {t: tok.token_to_id(t) for t in tokens}
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = hf_tok.get_vocab()
    return {t: vocab.get(t) for t in tokens}


def _special_token_ids(model_dir: Path, flags: dict[str, bool]) -> dict[str, int | None]:
    ids = lookup_token_ids(model_dir, [text for _, text, _ in MM_SPECIAL_TOKENS])
    missing = [
        f"{text} (needed by {flag}=true)"
        for _, text, flag in MM_SPECIAL_TOKENS
        if flags[flag] and ids[text] is None
    ]
    if missing:
        raise ValueError(f"tokenizer in {model_dir} lacks required multimodal tokens: {', '.join(missing)}")
    return {field: ids[text] for field, text, _ in MM_SPECIAL_TOKENS}


def _check_supported(raw: dict[str, Any]) -> None:
    expected = {
        "mm_projector_type": "identity",
        "mm_resampler_type": "qformer",
        "mm_cubing": "momentum",
    }
    for key, value in expected.items():
        if key in raw and raw[key] != value:
            raise NotImplementedError(f"{key}={raw[key]!r} is not supported (only {value!r})")
    if raw.get("is_cubing", True) is False:
        raise NotImplementedError("is_cubing=false is not supported")


def _generation_ids(model_dir: Path, raw: dict[str, Any]) -> dict[str, Any]:
    gen_path = model_dir / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    return {k: raw.get(k, gen.get(k)) for k in ("bos_token_id", "pad_token_id", "eos_token_id")}


def config_from_original(model_dir: str | Path) -> QuicksviewerConfig:
    """Build a QuicksviewerConfig from an ORIGINAL-format checkpoint directory."""
    model_dir = Path(model_dir)
    raw = _read_json(model_dir / "config.json")
    backbone = _text_backbone(raw)
    _check_supported(raw)

    text_config = _text_config_from_original(raw, backbone)
    tower_dir = _resolve_tower_dir(model_dir, raw.get("mm_vision_tower"))
    vision_config = _vision_config_from_dir(tower_dir)

    flags = {
        "mm_use_thumbnail": bool(raw.get("mm_use_thumbnail", True)),
        "mm_use_thumbnail_start_end": bool(raw.get("mm_use_thumbnail_start_end", False)),
        "mm_use_video_start_end": bool(raw.get("mm_use_video_start_end", False)),
        "mm_use_im_start_end": bool(raw.get("mm_use_im_start_end", False)),
        "mm_use_patch_start_end": bool(raw.get("mm_use_patch_start_end", False)),
    }
    # Thumbnail delimiters are only emitted when there is a thumbnail.
    required = dict(flags)
    required["mm_use_thumbnail_start_end"] = flags["mm_use_thumbnail"] and flags["mm_use_thumbnail_start_end"]
    token_ids = _special_token_ids(model_dir, required)

    if "num_heads" not in raw:
        raise ValueError(f"{model_dir}/config.json has no num_heads (resampler attention heads)")
    return QuicksviewerConfig(
        vision_config=vision_config,
        text_config=text_config,
        architectures=["QuicksviewerForCausalLM"],
        dtype=raw.get("torch_dtype", raw.get("dtype")),
        image_aspect_ratio=raw.get("image_aspect_ratio", "anyres"),
        image_grid_pinpoints=raw.get("image_grid_pinpoints"),
        num_queries=int(raw.get("num_queries", 64)),
        resampler_num_heads=int(raw["num_heads"]),
        conv_template=CONV_TEMPLATES[backbone],
        original_model_type=raw.get("model_type"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        **_preprocessor_fields(tower_dir, vision_config),
        **flags,
        **token_ids,
        **_generation_ids(model_dir, raw),
    )


def is_quicksviewer_checkpoint(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a Quicksviewer checkpoint, original or converted."""
    return str(_read_json(Path(model_dir) / "config.json").get("model_type", "")).startswith(
        "quicksviewer"
    )


def is_original_checkpoint(model_dir: str | Path) -> bool:
    raw = _read_json(Path(model_dir) / "config.json")
    return raw.get("model_type") != QuicksviewerConfig.model_type


def load_quicksviewer_config(model_dir: str | Path) -> QuicksviewerConfig:
    """Load the config of an original-format or a converted (cubeserve) Quicksviewer checkpoint."""
    model_dir = Path(model_dir)
    raw = _read_json(model_dir / "config.json")
    if raw.get("model_type") == QuicksviewerConfig.model_type:
        return QuicksviewerConfig.from_pretrained(str(model_dir))
    return config_from_original(model_dir)
