"""Model configurations; importing this package registers them with transformers' AutoConfig."""

from transformers import AutoConfig

from cubeserve.configs.quicksviewer import QuicksviewerConfig, load_quicksviewer_config

AutoConfig.register(QuicksviewerConfig.model_type, QuicksviewerConfig, exist_ok=True)

__all__ = ["QuicksviewerConfig", "load_quicksviewer_config"]
