"""Downstream metrics: splice a reconstruction into the language model at its hook and measure the damage.

Every batch of token windows runs through the model several times, differing only in what the hook
passes on at the *spliced positions* (``positions="real"``: attention-masked, non-special tokens, the rows
a store keeps by default; ``"all"``: every attention-masked token). Other positions keep their clean
activations.

    clean        no splice
    spliced      the autoencoder's reconstruction x̂
    zero         zeros (zero-ablation)
    mean         the mean activation (mean-ablation; the mean over the held-out store rows when given,
                 else over the spliced positions of the evaluated windows)
    with_error   x̂ + (x − x̂), i.e. the reconstruction with its error added back: equal to clean up to
                 float rounding, a check that the splice path itself changes nothing

For a transcoder (``source_hook``: the MLP's input, ``hook``: the MLP's output) "spliced" puts its
prediction from the activation at ``source_hook`` *of the same forward pass* in place of the activation at
``hook``, and "with_error" adds back the true output's difference; the ablations replace the output as for
an SAE. Every number below then means the same as for an SAE spliced at ``hook``.

Causal LMs: mean next-token cross-entropy over every attention-masked prediction (position t predicts
token t+1, both real), in nats; CE loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)
with zero-ablation as the reference (``ce_loss_recovered``) and mean-ablation beside it
(``ce_loss_recovered_mean``); the raw loss increase CE_spliced − CE_clean; KL(clean ‖ spliced) per
prediction, averaged the same way.

Encoders (BERT-style): the sentence embedding is the mean of the last hidden state over the attention-
masked tokens ([CLS] and [SEP] included), as sentence-transformers' mean pooling computes it. Reported:
the cosine similarity between clean and spliced (or ablated) embeddings, averaged over windows, and the
fraction recovered with 1 − cosine as the loss: (cos_spliced − cos_ablated) / (1 − cos_ablated).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.autoencoders import Autoencoder
from saekit.lm import make_capture, splice, splice_from
from saekit.lm.capture import position_ids_for
from saekit.schema import check_choice

POSITIONS = ("real", "all")
MODES = ("spliced", "zero", "mean", "with_error")


# ------------------------------------------------------------------------------ the definitions
def fraction_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(L_ablated − L_spliced) / (L_ablated − L_clean) for any loss L: 1 at clean, 0 at the ablation.

    NaN when the ablation does not change the loss (the ratio means nothing then)."""
    denom = ablated - clean
    return (ablated - spliced) / denom if denom != 0 else math.nan


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """CE loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)."""
    return fraction_recovered(ce_clean, ce_spliced, ce_ablated)


def embedding_recovered(cos_spliced: float, cos_ablated: float) -> float:
    """Fraction of the embedding recovered, with 1 − cos(clean, ·) as the loss (clean has loss 0)."""
    return fraction_recovered(0.0, 1.0 - cos_spliced, 1.0 - cos_ablated)


def headline(results: dict) -> tuple[str, float]:
    """The one downstream number a comparison table shows for these results."""
    if results.get("kind") == "causal":
        return "ce_loss_recovered", results["ce_loss_recovered"]
    return "cosine_spliced", results["cosine_spliced"]


# -------------------------------------------------------------------------------- the splice
Reconstruct = Callable[[Tensor], Tensor]


def as_reconstruct(model) -> Reconstruct:
    """An autoencoder (its forward's ``x_hat``, the same x̂ the reconstruction metrics see) or any
    callable [N, d] -> [N, d] on raw activations."""
    if isinstance(model, Autoencoder):
        model.eval()
        return lambda x: model(x.to(model.device)).x_hat
    return model


class _Replacement:
    """The splice function: rewrites the activations at the spliced positions of the current batch."""

    def __init__(self, reconstruct: Reconstruct, mean: Tensor | None):
        self.reconstruct, self.mean = reconstruct, mean
        self.mode = "spliced"
        self.where: Tensor | None = None  # bool [B, T] for the batch being run

    def __call__(self, act_BTD: Tensor, src_BTD: Tensor | None = None) -> Tensor:
        """``src_BTD``: the activation a transcoder predicts ``act_BTD`` from (None: an SAE's own input)."""
        where = self.where.to(act_BTD.device)
        if not bool(where.any()):
            return act_BTD
        x_ND = act_BTD[where]
        if self.mode == "zero":
            new_ND = torch.zeros_like(x_ND)
        elif self.mode == "mean":
            new_ND = self.mean.to(x_ND.device, x_ND.dtype).expand_as(x_ND)
        else:
            x = x_ND.float()
            given = x if src_BTD is None else src_BTD[where].float()
            x_hat = self.reconstruct(given).to(x.device, x.dtype)
            new_ND = x_hat + (x - x_hat) if self.mode == "with_error" else x_hat
            new_ND = new_ND.to(x_ND.device, x_ND.dtype)
        out = act_BTD.clone()
        out[where] = new_ND
        return out


def splice_positions(tokenizer, ids: Tensor, mask: Tensor, positions: str) -> Tensor:
    """Bool [B, T]: where the splice replaces activations."""
    check_choice(positions, POSITIONS, "splice positions")
    where = mask.bool()
    if positions == "real":
        from saekit.data.tokens import special_mask

        where = where & ~special_mask(tokenizer, ids)
    return where


def _forward(lm, ids: Tensor, mask: Tensor) -> Tensor:
    """Logits [B, T, V] (causal) or last hidden state [B, T, d] (encoder)."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    params = inspect.signature(lm.model.forward).parameters
    pos = position_ids_for(mask)
    if pos is not None and "position_ids" in params:
        kwargs["position_ids"] = pos
    if "use_cache" in params:
        kwargs["use_cache"] = False
    out = lm.model(**kwargs)
    return (out.logits if lm.is_causal else out.last_hidden_state).float()


@torch.inference_mode()
def mean_activation(lm, hook: str, tokens: Tensor, where_fn, batch_size: int = 8) -> Tensor:
    """Mean activation at ``hook`` over the positions ``where_fn(ids, mask)`` selects (float64 [d])."""
    total, count = None, 0
    with make_capture(lm, [hook]) as capture:
        for ids in tokens.split(batch_size):
            mask = torch.ones_like(ids)
            act = capture(ids.to(lm.device), mask.to(lm.device))[hook]
            x = act[where_fn(ids, mask).to(act.device)].double()
            total = x.sum(0) if total is None else total + x.sum(0)
            count += x.shape[0]
    if not count:
        raise ValueError("no positions to average over")
    return total / count


# ------------------------------------------------------------------------------- the metrics
class _Sums:
    def __init__(self):
        self.values: dict[str, float] = {}

    def add(self, name: str, value: Tensor) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(value.double().sum())


@torch.inference_mode()
def downstream_metrics(lm, hook: str, model, tokens: Tensor, attention_mask: Tensor | None = None, *,
                       backend: str = "hf", positions: str = "real", mean: Tensor | None = None,
                       batch_size: int = 8, error_check: bool = False, source_hook: str | None = None) -> dict:
    """Splice ``model``'s reconstruction into ``lm`` at ``hook`` over ``tokens`` [N, T]; see the module
    docstring for every number returned. ``model`` is an autoencoder or a callable on raw activations;
    with ``source_hook`` (a transcoder) it maps the activation there to a replacement for ``hook``'s."""
    tokens = torch.as_tensor(tokens).long()
    if tokens.ndim != 2 or not len(tokens):
        raise ValueError(f"tokens must be a non-empty [n_sequences, T] tensor, got {tuple(tokens.shape)}")
    masks = torch.ones_like(tokens) if attention_mask is None else torch.as_tensor(attention_mask).long()

    def where_fn(ids, mask):
        return splice_positions(lm.tokenizer, ids, mask, positions)

    if mean is None:
        mean = mean_activation(lm, hook, tokens, where_fn, batch_size)
    replace = _Replacement(as_reconstruct(model), mean.float())
    modes = [m for m in MODES if m != "with_error" or error_check]
    sums, n_pred, n_seq, n_spliced = _Sums(), 0, 0, 0
    for ids, mask in zip(tokens.split(batch_size), masks.split(batch_size)):
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        replace.where = where_fn(ids, mask)
        n_spliced += int(replace.where.sum())
        clean = _forward(lm, ids, mask)
        if lm.is_causal:
            valid = (mask[:, :-1] * mask[:, 1:]).bool()
            target = ids[:, 1:][valid]
            logp_clean = F.log_softmax(clean[:, :-1][valid], -1)
            sums.add("ce_clean", -logp_clean.gather(1, target[:, None]))
            n_pred += int(valid.sum())
        else:
            pooled_clean = _mean_pool(clean, mask)
            n_seq += ids.shape[0]
        for mode in modes:
            replace.mode = mode
            spliced = (splice(lm, hook, replace, backend=backend) if source_hook is None
                       else splice_from(lm, source_hook, hook, replace, backend=backend))
            with spliced:
                out = _forward(lm, ids, mask)
            if lm.is_causal:
                logp = F.log_softmax(out[:, :-1][valid], -1)
                sums.add(f"ce_{mode}", -logp.gather(1, target[:, None]))
                sums.add(f"kl_{mode}", (logp_clean.exp() * (logp_clean - logp)).sum(-1))
            else:
                sums.add(f"cos_{mode}", F.cosine_similarity(pooled_clean, _mean_pool(out, mask), dim=-1))
    common = {"backend": backend, "positions": positions, "sequences": len(tokens),
              "spliced_positions": n_spliced, "hook": hook}
    if source_hook is not None:
        common["source_hook"] = source_hook
    s = sums.values
    if lm.is_causal:
        ce = {m: s[f"ce_{m}"] / n_pred for m in ["clean", *modes]}
        res = {"kind": "causal", "ce_clean": ce["clean"], "ce_spliced": ce["spliced"],
               "ce_zero_ablated": ce["zero"], "ce_mean_ablated": ce["mean"],
               "loss_increase": ce["spliced"] - ce["clean"],
               "ce_loss_recovered": ce_loss_recovered(ce["clean"], ce["spliced"], ce["zero"]),
               "ce_loss_recovered_mean": ce_loss_recovered(ce["clean"], ce["spliced"], ce["mean"]),
               "kl_clean_spliced": s["kl_spliced"] / n_pred,
               "kl_clean_zero_ablated": s["kl_zero"] / n_pred,
               "kl_clean_mean_ablated": s["kl_mean"] / n_pred,
               "predictions": n_pred}
        if error_check:
            res.update(ce_with_error=ce["with_error"], loss_increase_with_error=ce["with_error"] - ce["clean"],
                       kl_clean_with_error=s["kl_with_error"] / n_pred)
        return {**res, **common}
    cos = {m: s[f"cos_{m}"] / n_seq for m in modes}
    res = {"kind": "encoder", "cosine_spliced": cos["spliced"], "cosine_zero_ablated": cos["zero"],
           "cosine_mean_ablated": cos["mean"],
           "embedding_recovered": embedding_recovered(cos["spliced"], cos["zero"]),
           "embedding_recovered_mean": embedding_recovered(cos["spliced"], cos["mean"])}
    if error_check:
        res["cosine_with_error"] = cos["with_error"]
    return {**res, **common}


def _mean_pool(hidden_BTD: Tensor, mask_BT: Tensor) -> Tensor:
    """Sentence-transformers mean pooling: average the last hidden state over attention-masked tokens."""
    m = mask_BT.to(hidden_BTD.dtype)[..., None]
    return (hidden_BTD * m).sum(1) / m.sum(1).clamp_min(1e-9)
