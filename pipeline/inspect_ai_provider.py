"""Registers the `mlx-pipeline` model provider with Inspect AI, which imports this module through
the `inspect_ai` entry point in pyproject.toml. Kept free of MLX and of the provider itself: Inspect
imports every entry point to resolve a name, so the heavy module loads only when it is asked for."""

from inspect_ai.model import modelapi


@modelapi(name="mlx-pipeline")
def mlx_pipeline():
    from .inspect_ai_model import MLXPipelineAPI

    return MLXPipelineAPI
