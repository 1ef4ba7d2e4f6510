"""Language models: load by id or path, capture activations at TransformerLens hook names, splice.

Nothing here imports from the rest of saekit except ``saekit.config``: later stages build on it."""
from saekit.lm.capture import BACKENDS, HFCapture, TLCapture, make_capture
from saekit.lm.hooks import (
    HOOK_KINDS,
    LAYOUTS,
    UnknownHookError,
    UnsupportedArchitectureError,
    valid_hook_names,
)
from saekit.lm.loading import LoadedLM, load_lm, unembedding
from saekit.lm.splice import splice

__all__ = [
    "BACKENDS",
    "HOOK_KINDS",
    "LAYOUTS",
    "HFCapture",
    "LoadedLM",
    "TLCapture",
    "UnknownHookError",
    "UnsupportedArchitectureError",
    "load_lm",
    "make_capture",
    "splice",
    "unembedding",
    "valid_hook_names",
]
