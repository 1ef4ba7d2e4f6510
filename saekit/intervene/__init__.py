"""SAEs inside the model: attach saved SAEs at their hooks, read per-token features, ablate / clamp /
scale features, steer generation or an encoder's forward pass, and attribute a target to features.

Below analysis, above lm and autoencoders; see ``saekit.intervene.run`` for the semantics."""
from saekit.intervene.display import Comparison, tokens_html
from saekit.intervene.edits import Edit, FeatureEdit, VectorEdit
from saekit.intervene.results import Attribution, FeatureActs
from saekit.intervene.run import Run, attach

__all__ = ["Attribution", "Comparison", "Edit", "FeatureActs", "FeatureEdit", "Run", "VectorEdit", "attach",
           "tokens_html"]
