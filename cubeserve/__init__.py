"""cubeserve: an SGLang-style serving engine for long-video multimodal models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":
        from cubeserve.engine.engine import Engine

        return Engine
    raise AttributeError(name)
