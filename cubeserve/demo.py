"""The built-in demo checkpoint: a tiny random Quicksviewer with a locally trained tokenizer.

It lets every command run with no download (``--model-path`` omitted): a Qwen2 backbone, a
SigLIP tower, cubing, the 3D resampler and the thumbnail, in cubeserve's converted format
(``model_type: "quicksviewer"``), so text, image and video requests all take the real path.
The answers are gibberish; everything is seeded, so two builds are byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from torch import nn
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
)

from cubeserve.configs.quicksviewer import MM_SPECIAL_TOKENS, QuicksviewerConfig
from cubeserve.engine.chat_template import CHATML
from cubeserve.engine.tokenizer import load_tokenizer
from cubeserve.models.quicksviewer_vision import QuicksviewerVisionEncoder

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEMO_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# <patch_start> ... <thumbnail_end>, in the order the original appends them to the vocabulary.
DEMO_MM_TOKENS = tuple(text for _, text, _ in MM_SPECIAL_TOKENS)
DEMO_BPE_MAX_VOCAB_SIZE = 1024  # an upper bound: the small corpus yields about 430 tokens
DEMO_SEED = 0
DEMO_MODEL_NAME = "cubeserve-demo"  # the name the server lists for the built-in model
# Qwen2's pre-tokenizer split; transformers rebuilds this pipeline when it loads a Qwen2 tokenizer.
QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
DEMO_TEXT_CONFIG = {
    "hidden_size": 64,  # also the resampler width, which must be a multiple of 16
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
DEMO_VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,  # a 2x2 patch grid, resized to the 24x24 feature grid like any SigLIP
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
DEMO_MULTIMODAL_CONFIG = {
    "num_queries": 64,
    "resampler_num_heads": 4,
    "image_aspect_ratio": "anyres",
    "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],  # anyres: 1 + 2 or 4 views per image
    "mm_use_thumbnail": True,
    "mm_use_thumbnail_start_end": True,
    "mm_use_video_start_end": True,
    "mm_use_im_start_end": True,
    "mm_use_patch_start_end": True,
    "conv_template": "qwen2",
}
PREPROCESSOR_CONFIG = "preprocessor_config.json"

DEMO_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
A serving engine batches many requests together so the accelerator stays busy.
Each request brings a prompt, and the model answers one token at a time.
The scheduler decides which requests run next and how much memory each one may use.
Prefix caching lets requests that share the beginning of a prompt reuse earlier work.
Video understanding models read frames, group them into cubes, and describe what happens.
Hello! How are you today? I am fine, thank you. What would you like to know?
Please summarize the following paragraph in one short sentence.
Once upon a time there was a little robot who wanted to learn how to paint.
It practiced every morning, mixing colors and drawing the mountains near its home.
The weather is sunny with a light breeze, and the temperature is about twenty degrees.
Numbers such as 1, 2, 3, 42, 100 and 2024 appear in text more often than you might think.
Water boils at one hundred degrees Celsius at sea level and freezes at zero.
The library opens at nine in the morning and closes at six in the evening.
She said that the meeting had been moved to Thursday afternoon because of the holiday.
Good questions often lead to better answers, and careful reading saves time later.
The system prompt tells the assistant how to behave during the conversation.
User: Can you describe the video? Assistant: A person walks a dog along the beach.
Computers store text as bytes, and a tokenizer turns those bytes into numbers.
When the answer is complete, the model writes an end of turn token and stops.
"""


def default_demo_dir() -> Path:
    cache = os.environ.get("CUBESERVE_CACHE")
    root = Path(cache) if cache else Path.home() / ".cache" / "cubeserve"
    return root / "demo-quicksviewer"  # renamed from "demo-model" (text-only) so no stale copy is reused


def ensure_demo_model(path: str | os.PathLike[str] | None = None) -> str:
    """Directory of the demo checkpoint, written on first use (atomically: temp dir + rename)."""
    target = Path(path).expanduser() if path is not None else default_demo_dir()
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_demo_model(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def write_demo_model(directory: str | os.PathLike[str]) -> None:
    """Tokenizer, config, preprocessor config, seeded fp32 weights and generation config."""
    directory = Path(directory)
    tokenizer = write_demo_tokenizer(directory, extra_special_tokens=DEMO_MM_TOKENS)
    config = demo_config(tokenizer)
    config.to_json_file(str(directory / "config.json"), use_diff=False)
    (directory / PREPROCESSOR_CONFIG).write_text(json.dumps(_preprocessor_config(config), indent=2) + "\n")
    weights = demo_weights(config, control_token_ids=tokenizer.all_special_ids)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(
        str(directory)
    )


def write_demo_tokenizer(
    directory: str | os.PathLike[str], extra_special_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerBase:
    """Train a Qwen2-style byte-level BPE (well under a second), save it with a ChatML template,
    and return it as ``AutoTokenizer`` loads it."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_BPE_MAX_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[*DEMO_SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(DEMO_CORPUS.splitlines(keepends=True), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, *extra_special_tokens],
        chat_template=CHATML,
    )
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    return load_tokenizer(directory)



def demo_config(tokenizer: PreTrainedTokenizerBase) -> QuicksviewerConfig:
    """The demo's converted-format config, with the multimodal special-token ids of ``tokenizer``."""
    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    token_ids = dict(
        zip(
            (field for field, _, _ in MM_SPECIAL_TOKENS),
            tokenizer.convert_tokens_to_ids(list(DEMO_MM_TOKENS)),
            strict=True,
        )
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        eos_token_id=im_end,
        pad_token_id=endoftext,
        architectures=["Qwen2ForCausalLM"],
        dtype="float32",
        **DEMO_TEXT_CONFIG,
    )
    return QuicksviewerConfig(
        vision_config=SiglipVisionConfig(**DEMO_VISION_CONFIG),
        text_config=text_config,
        architectures=["QuicksviewerForCausalLM"],
        dtype="float32",
        image_size=DEMO_VISION_CONFIG["image_size"],
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        **DEMO_MULTIMODAL_CONFIG,
        **token_ids,
    )


def demo_weights(config: QuicksviewerConfig, control_token_ids: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """Seeded random weights under cubeserve's names (the LM's are the HF Qwen2 names).

    ``control_token_ids`` get all-zero output embeddings: a logit of 0, below about half of
    the vocabulary, so greedy answers never stop early or write control tokens, and sampled ones
    rarely do (answers run to ``max_tokens``, as serving benchmarks expect).
    """
    language_model = Qwen2ForCausalLM(config.text_config)
    vision = QuicksviewerVisionEncoder(config)
    randomize_weights(language_model, DEMO_SEED)
    randomize_weights(vision, DEMO_SEED + 1)
    with torch.no_grad():
        language_model.lm_head.weight[list(control_token_ids)] = 0.0
    # Parameters only: the loader rejects names it has no parameter for.
    return {
        name: tensor.detach().contiguous()
        for module in (language_model, vision)
        for name, tensor in module.named_parameters()
    }


def randomize_weights(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Seeded N(0, std) values everywhere; normalization gains are 1 + N(0, std).

    Default initialisers leave zero biases, unit norms and, for a tiny model, near-uniform logits
    that make every greedy decision a near-tie (and hide weight-loading bugs in tests).
    """
    gains = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if "Norm" in type(module).__name__
    }
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(noise + 1.0 if name in gains else noise)


def _preprocessor_config(config: QuicksviewerConfig) -> dict:
    """SigLIP's image processor settings, for HF tooling (cubeserve reads them from config.json)."""
    size = config.image_size
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": config.rescale_factor,
        "do_normalize": True,
        "image_mean": config.image_mean,
        "image_std": config.image_std,
    }


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def _publish(staging: Path, target: Path) -> None:
    try:
        os.replace(staging, target)  # also replaces an empty ``target`` directory
    except OSError:
        if not _is_complete(target):  # otherwise a concurrent writer finished first
            raise
