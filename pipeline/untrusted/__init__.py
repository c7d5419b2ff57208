"""Checks for files and text that come from outside (downloads, users): run before any parser sees them.

- `check_safetensors(path)`: the safetensors header, by the reference library's rules.
- `check_gguf(path)`: every count, length, type and offset of a GGUF header against the file size.
- `render_chat(template, ...)`: a chat template rendered in a sandbox with time and size limits.

The file checks read only the header (a bounded number of bytes), in plain Python, so a hostile
file cannot make native code (MLX, llama.cpp, gguf-py's numpy views) read out of bounds,
allocate without limit or loop. They raise `UntrustedFileError` naming the file and the defect.
"""

from .chat_template import render_chat
from .gguf_header import check_gguf
from .safetensors_header import check_safetensors

__all__ = ["check_gguf", "check_safetensors", "render_chat"]
