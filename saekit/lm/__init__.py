"""Language models: load by id or path, capture activations at TransformerLens hook names, splice.

Nothing here imports from the rest of saekit except ``saekit.config`` (and its errors and schema):
later stages build on it. A store's model is loaded from the store's manifest (a plain dict), so this
package needs nothing of data/."""
from saekit.lm.capture import BACKENDS, HFCapture, TLCapture, make_capture, open_capture
from saekit.lm.hooks import (
    HOOK_KINDS,
    LAYOUTS,
    UnknownHookError,
    UnsupportedArchitectureError,
    valid_hook_names,
)
from saekit.lm.loading import LoadedLM, load_lm, load_manifest_lm, load_manifest_tokenizer, unembedding
from saekit.lm.hooks import mlp_hooks
from saekit.lm.splice import splice, splice_from

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
    "load_manifest_lm",
    "load_manifest_tokenizer",
    "make_capture",
    "mlp_hooks",
    "open_capture",
    "splice",
    "splice_from",
    "unembedding",
    "valid_hook_names",
]
