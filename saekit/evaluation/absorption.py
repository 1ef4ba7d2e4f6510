"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"; as in SAEBench's
``absorption_first_letter``), built from the language model's own vocabulary.

1. **Words.** Every vocabulary entry that is one whole word of ASCII letters (at least two; WordPiece's
   ``##`` pieces and specials excluded; a leading-space marker allowed) is a candidate; ``words`` of them
   are sampled and split by word, 80% train / 20% test.
2. **Activations.** Each word in each template (``{word}``, ``the word {word} means``, ...) is run through
   the LM; the activation at the SAE's hook, at the word's own position, is one example.
3. **Ground-truth probes.** One logistic probe per first letter (one-vs-rest) on the raw activations of
   the training words (logistic.py). Letters whose probe reaches F1 <= ``min_probe_f1`` (0.6, SAEBench's
   ``min_GT_probe_f1``) on the test words are not evaluated: absorption needs a probe that knows the
   letter. (On all-MiniLM-L6-v2 no letter passes 0.6: its activations hold the first letter weakly.)
4. **Main latents (k-sparse probing).** Latents are ranked per letter by the difference of their mean
   activation on the letter's training examples and on the rest (largest positive first: latents that
   say *yes*); a logistic probe on the top k is fitted for k = 1 .. ``max_k``. The letter's main latents
   are the top k of the last k whose test F1 rose by more than 0.03 over the best before it (k = 1
   always counts); ``num_split_features`` is their number.
5. **Absorption fraction** (per test example the probe calls correctly, SAEBench's definition): with p
   the probe's unit direction, the example's probe projection is ``(x - decode(0)) . p`` (the part of the
   activation the latents must account for; SAEBench uses ``x . p``) and latent i's is
   ``a_i * (d_i . p)`` with d_i its decoder vector in activation units (= ``a_i * cos_i`` for SAEBench's
   unit-norm decoders). Absorbers are non-main latents with positive projection and ``cos(d_i, p) >= 0.1``;
   the top 3 count. The fraction is 0 when the main latents' projection covers the example's or the
   absorbers carry less than 40% of it; 1 when the main latents' projection is <= 0; else
   ``min(absorbed, unaccounted) / (min(absorbed, unaccounted) + main)``. **Full absorption**: every main
   latent silent, the top-projecting latent has cosine >= 0.025 with p and carries >= 40% of the
   example's projection. Per letter both are averaged over the probe's true positives; the overall
   numbers are the means (and standard deviations) over the evaluated letters.
"""
from __future__ import annotations

import random
import statistics

import torch
from torch import Tensor

from saekit.evaluation.logistic import f1, fit_logistic

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_PROBE_F1 = 0.6
F1_JUMP = 0.03
FRACTION_COS = 0.1
FULL_COS = 0.025
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
EPS = 1e-8


# ------------------------------------------------------------------------------------- the task
def vocab_words(tokenizer) -> list[tuple[int, str]]:
    """(token id, word) of every vocabulary entry that is one whole word of ASCII letters (see above)."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None or piece.startswith("##"):
            continue
        word = tokenizer.convert_tokens_to_string([piece]).strip()
        if len(word) >= 2 and word.isascii() and word.isalpha():
            out.append((i, word))
    return out


def template_ids(tokenizer, template: str, word_id: int, leading_space: bool) -> tuple[list[int], int]:
    """Input ids of ``template`` with the word's token in place of ``{word}``, and its position."""
    from saekit.data.tokens import wrapper_ids

    prefix, suffix = wrapper_ids(tokenizer)
    before, after = template.split("{word}")
    if leading_space:  # the token carries its own space (byte-level BPE's Ġ, SentencePiece's ▁)
        before = before.rstrip(" ")
    left = tokenizer(before, add_special_tokens=False)["input_ids"] if before.strip() else []
    right = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    ids = prefix + left + [word_id] + right + suffix
    return ids, len(prefix) + len(left)


@torch.no_grad()
def first_letter_data(lm, hook: str, n_words: int, templates: list[str], seed: int = 0,
                      batch_prompts: int = 256, progress: bool = False) -> dict:
    """The examples of the first-letter task: ``acts`` [n, d] at ``hook``, ``letter`` [n] (0..25),
    ``word`` [n] (index into ``words``), ``train`` [n] bool, and the ``words`` themselves."""
    from tqdm.auto import tqdm

    from saekit.lm import make_capture

    tok = lm.tokenizer
    vocab = [(i, w) for i, w in vocab_words(tok) if w[0].lower() in LETTERS]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(vocab, min(n_words, len(vocab))), key=lambda t: t[0])
    order = list(range(len(chosen)))
    rng.shuffle(order)
    train_words = set(order[: int(0.8 * len(order))])
    pieces = tok.convert_ids_to_tokens([i for i, _ in chosen])
    acts, letters, words = [], [], []
    with make_capture(lm, [hook]) as capture:
        bar = tqdm(total=len(chosen) * len(templates), desc="absorption prompts", unit="prompt",
                   disable=not progress, leave=False)
        for template in templates:
            built = [template_ids(tok, template, i, p.startswith(("Ġ", "▁"))) for (i, _), p in zip(chosen, pieces)]
            by_len: dict[int, list[int]] = {}
            for j, (ids, _) in enumerate(built):
                by_len.setdefault(len(ids), []).append(j)  # same length: no padding needed
            for members in by_len.values():
                for a in range(0, len(members), batch_prompts):
                    js = members[a:a + batch_prompts]
                    ids = torch.tensor([built[j][0] for j in js])
                    pos = torch.tensor([built[j][1] for j in js])
                    out = capture(ids)[hook]
                    acts.append(out[torch.arange(len(js)), pos.to(out.device)].float().cpu())
                    letters += [LETTERS.index(chosen[j][1][0].lower()) for j in js]
                    words += js
                    bar.update(len(js))
        bar.close()
    word_t = torch.tensor(words)
    return {"acts": torch.cat(acts), "letter": torch.tensor(letters), "word": word_t,
            "train": torch.tensor([w in train_words for w in words]), "words": [w for _, w in chosen]}


# ---------------------------------------------------------------------------------- the metric
@torch.no_grad()
def decoder_vectors(model, batch: int = 1024) -> tuple[Tensor, Tensor]:
    """(d [n_latents, d_in], decode(0) [d_in]): each latent's decoder vector in activation units,
    decode(e_i) - decode(0) (exact for every affine decoder)."""
    device = model.device
    zero = model.decode(torch.zeros(1, model.n_latents, device=device))
    rows = []
    for a in range(0, model.n_latents, batch):
        eye = torch.zeros(min(batch, model.n_latents - a), model.n_latents, device=device)
        eye[torch.arange(eye.shape[0]), torch.arange(a, a + eye.shape[0])] = 1.0
        rows.append(model.decode(eye) - zero)
    return torch.cat(rows).float().cpu(), zero[0].float().cpu()


@torch.no_grad()
def encode_all(model, x: Tensor, batch: int = 4096) -> Tensor:
    """Dense codes [n, n_latents] of raw activations (on the CPU)."""
    model.eval()
    return torch.cat([model.encode(c.to(model.device)).float().cpu() for c in x.split(batch)])


def mean_difference(codes: Tensor, labels: Tensor) -> Tensor:
    """[P, n_latents]: mean code on each task's positives minus on its negatives (labels [P, n] bool)."""
    pos = labels.float()
    neg = 1.0 - pos
    return (pos @ codes) / pos.sum(1, keepdim=True).clamp(min=1) - (neg @ codes) / neg.sum(1, keepdim=True).clamp(min=1)


def absorption_scores(model, acts: Tensor, letter: Tensor, train: Tensor, max_k: int = 10,
                      min_probe_f1: float = MIN_PROBE_F1) -> dict:
    """The absorption metrics (module docstring) of ``model`` on first-letter examples ``acts`` [n, d]
    with letters [n] (0..25) and a train/test split [n] bool."""
    acts = acts.float()
    letter, train = letter.long(), train.bool()
    test = ~train
    y = torch.stack([letter == j for j in range(len(LETTERS))])  # [26, n]
    present = [j for j in range(len(LETTERS)) if y[j, train].any() and y[j, test].any()]
    y = y[present]
    # 3. ground-truth probes on the raw activations
    w, b = fit_logistic(acts[train], y[:, train])
    probe_logits = acts @ w.T + b  # [n, P]
    probe_f1 = f1((probe_logits[test] > 0).T, y[:, test])
    # 4. main latents by k-sparse probing on the codes
    codes = encode_all(model, acts)
    diff = mean_difference(codes[train], y[:, train])
    max_k = min(max_k, codes.shape[1])
    top = diff.topk(max_k, dim=1).indices  # [P, max_k]
    gathered = codes[:, top].permute(1, 0, 2)  # [P, n, max_k]
    f1_k = []
    for k in range(1, max_k + 1):
        xk = gathered[..., :k]
        wk, bk = fit_logistic(xk[:, train], y[:, train])
        logits = torch.einsum("pnk,pk->pn", xk[:, test], wk) + bk[:, None]
        f1_k.append(f1(logits > 0, y[:, test]))
    f1_k = torch.stack(f1_k, 1)  # [P, max_k]
    # 5. absorption on the probe's true positives
    dec, zero = decoder_vectors(model)
    unit = w / w.norm(dim=1, keepdim=True).clamp(min=EPS)  # [P, d]
    dec_proj = unit @ dec.T  # [P, n_latents]: d_i . p
    cos = dec_proj / dec.norm(dim=1).clamp(min=EPS)
    details, skipped = [], []
    for row, j in enumerate(present):
        if probe_f1[row] <= min_probe_f1:
            skipped.append(LETTERS[j])
            continue
        main = _split_features(f1_k[row], top[row])
        rows = (test & y[row] & (probe_logits[:, row] > 0)).nonzero().flatten()
        fractions, full = _absorption(codes[rows], (acts[rows] - zero) @ unit[row], dec_proj[row],
                                      cos[row], main)
        n_tp = len(rows)
        details.append({"first_letter": LETTERS[j],
                        "mean_absorption_fraction": fractions.sum().item() / max(n_tp, 1),
                        "full_absorption_rate": full.sum().item() / max(n_tp, 1),
                        "num_full_absorption": int(full.sum()),
                        "num_probe_true_positives": n_tp, "num_split_features": len(main),
                        "split_features": main, "probe_f1": probe_f1[row].item(),
                        "sparse_probe_f1": [round(v, 4) for v in f1_k[row].tolist()]})
    return {"letters": details, "letters_skipped": skipped, **_summary(details), "min_probe_f1": min_probe_f1,
            "probe_f1": {LETTERS[j]: round(probe_f1[row].item(), 4) for row, j in enumerate(present)},
            "examples": int(len(acts)), "train_examples": int(train.sum()), "test_examples": int(test.sum()),
            "max_k": max_k}


def _split_features(f1_row: Tensor, top_row: Tensor) -> list[int]:
    best, chosen = -100.0, []
    for k, score in enumerate(f1_row.tolist(), start=1):
        if score > best + F1_JUMP:
            best, chosen = score, top_row[:k].tolist()
        else:
            break
    return chosen


def _absorption(codes: Tensor, act_proj: Tensor, dec_proj: Tensor, cos: Tensor, main: list[int]
                ) -> tuple[Tensor, Tensor]:
    """Per example: the absorption fraction and whether it is full absorption (module docstring)."""
    m = len(codes)
    if m == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    lat_proj = codes * dec_proj  # [m, n_latents]
    is_main = torch.zeros(codes.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = lat_proj[:, is_main].sum(1)
    candidate = (~is_main & (cos >= FRACTION_COS))[None] & (lat_proj > 0)
    absorbed = torch.where(candidate, lat_proj, torch.zeros_like(lat_proj))
    absorbed = absorbed.topk(min(MAX_ABSORBERS, absorbed.shape[1]), dim=1).values.sum(1)
    share = absorbed / torch.where(act_proj.abs() > EPS, act_proj, torch.full_like(act_proj, EPS))
    unaccounted = act_proj - main_proj
    part = torch.minimum(absorbed, unaccounted)
    fraction = (part / (part + main_proj).clamp(min=EPS)).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, torch.ones_like(fraction), fraction)
    fraction = torch.where((main_proj >= act_proj) | (share < PROJECTION_SHARE), torch.zeros_like(fraction), fraction)
    top_val, top_id = lat_proj.max(1)
    full = ((codes[:, is_main] < EPS).all(1) & (cos[top_id] >= FULL_COS) & (act_proj >= 0)
            & (top_val / act_proj.clamp(min=EPS) >= PROJECTION_SHARE))
    return fraction, full


def _summary(details: list[dict]) -> dict:
    def stats(key):
        vals = [d[key] for d in details]
        if not vals:
            return None, None
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    frac, frac_sd = stats("mean_absorption_fraction")
    full, full_sd = stats("full_absorption_rate")
    split, split_sd = stats("num_split_features")
    return {"mean_absorption_fraction": frac, "std_absorption_fraction": frac_sd,
            "mean_full_absorption": full, "std_full_absorption": full_sd,
            "mean_num_split_features": split, "std_num_split_features": split_sd,
            "letters_evaluated": len(details)}


def absorption_eval(model, lm, hook: str, cfg, progress: bool = False) -> dict:
    """The first-letter absorption of ``model`` (an SAE at ``hook`` of ``lm``), sized by an EvalConfig."""
    data = first_letter_data(lm, hook, cfg.absorption_words, cfg.absorption_templates, seed=cfg.seed,
                             progress=progress)
    result = absorption_scores(model, data["acts"], data["letter"], data["train"], cfg.absorption_max_k,
                               cfg.absorption_min_probe_f1)
    result.update(words=len(data["words"]), templates=list(cfg.absorption_templates))
    return result
