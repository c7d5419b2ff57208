"""Errors the user can act on. The CLI prints their message alone (no traceback) and exits 2."""


class PipelineError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class ConfigError(PipelineError):
    """A bad config key or value."""


class DataError(PipelineError):
    """Malformed training data."""


class MissingInputError(PipelineError):
    """A phase's input is missing; the message names the command that makes it."""


class UntrustedFileError(PipelineError):
    """A model file (safetensors, GGUF) whose header breaks its format: refused before any reader parses it."""
