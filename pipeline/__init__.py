"""MLX fine-tune -> fuse -> Hugging Face -> GGUF pipeline."""

__version__ = "0.1.0"
