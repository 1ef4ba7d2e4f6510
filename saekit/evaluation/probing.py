"""k-sparse probing (Gao et al. 2024; SAEBench's ``sparse_probing``) on binary tasks whose labels come
from the text itself, built offline from the store's token table (and, for the built-in corpus, from
where each docstring came from).

Tasks, on the store's held-out rows:

* token level (labels from the window's token ids; the tokenizer decodes them):
  ``digit`` (the token is all digits), ``word_start`` (a letter token that starts a word continued by a
  WordPiece ``##`` piece, or a leading-space token followed by one without), ``open_bracket`` (``(``,
  ``[`` or ``{``), ``inside_parens`` (a letter token inside an open ``(`` of its docstring),
  ``doctest_code`` (a letter token within 12 tokens after a ``>>>`` prompt: an identifier inside a code
  example);
* sequence level (built-in corpus only; one example = the mean over the rows of one docstring within
  one window): ``package=NAME``, the docstring came from standard-library package (or module) NAME,
  one-vs-rest for the ``sequence_tasks`` packages with the most examples.

Each task samples up to ``examples`` rows (half positive where the text has enough), split by window:
windows whose index is divisible by 5 are the test split (a docstring's pieces never straddle it).
Latents are ranked by |mean on positives - mean on negatives| over the training split; a logistic probe
(logistic.py) on the top k latents, for each k, is scored by held-out accuracy, beside probes on all
latents, on all raw activation dimensions (``llm_test_accuracy``), on the top k raw dimensions by the
same ranking (``llm_top_k``, SAEBench's baseline) and on the top k principal components of the held-out
activations (``pca_top_k``).
"""
from __future__ import annotations

import random

import torch
from torch import Tensor

from saekit.evaluation.logistic import accuracy, fit_logistic

TEST_EVERY = 5  # windows with index % 5 == 0 are the test split
DOCTEST_SPAN = 12
MIN_POSITIVES = 10  # per split: fewer and the task is skipped
MIN_SEGMENT = 4  # rows a docstring needs in a window to be a sequence-level example


# ------------------------------------------------------------------------------------ token tasks
def _vocab_flags(tokenizer) -> dict[str, Tensor]:
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
    special = torch.zeros(n, dtype=torch.bool)
    special[[i for i in tokenizer.all_special_ids if i < n]] = True
    cont = torch.tensor([p is not None and p.startswith("##") and len(p) > 2 for p in pieces])
    spaced = torch.tensor([p is not None and p[:1] in ("Ġ", "▁") for p in pieces])
    stripped = [t.strip() for t in texts]
    return {"special": special, "continuation": cont, "spaced": spaced,
            "digit": torch.tensor([t.isdigit() and t.isascii() for t in stripped]),
            "alpha": torch.tensor([t.isalpha() for t in stripped]),
            "open": torch.tensor([t in ("(", "[", "{") for t in stripped]),
            "lparen": torch.tensor([t == "(" for t in stripped]),
            "rparen": torch.tensor([t == ")" for t in stripped]),
            "gt": torch.tensor([t == ">" for t in stripped]),
            "prompt": torch.tensor([t == ">>>" for t in stripped])}


def token_labels(tokenizer, windows: Tensor) -> dict[str, Tensor]:
    """Bool [n_windows, ctx] per token-level task (module docstring)."""
    f = _vocab_flags(tokenizer)
    w = windows.long()
    letter = f["alpha"][w] & ~f["special"][w]
    nxt = torch.full_like(w, int(f["special"].nonzero()[0]) if f["special"].any() else 0)
    nxt[:, :-1] = w[:, 1:]
    if f["continuation"].any():  # WordPiece
        starts = letter & ~f["continuation"][w] & f["continuation"][nxt]
    else:  # leading-space tokens start words
        starts = letter & f["spaced"][w] & f["alpha"][nxt] & ~f["spaced"][nxt]
    inside = torch.zeros_like(w, dtype=torch.bool)
    doctest = torch.zeros_like(w, dtype=torch.bool)
    special, lp, rp, gt, prompt = (f[k][w].tolist() for k in ("special", "lparen", "rparen", "gt", "prompt"))
    for i in range(w.shape[0]):
        depth, since, run = 0, DOCTEST_SPAN + 1, 0
        for j in range(w.shape[1]):
            if special[i][j]:  # a separator: the next docstring starts
                depth, since, run = 0, DOCTEST_SPAN + 1, 0
                continue
            run = run + 1 if gt[i][j] else 0
            if prompt[i][j] or run == 3:
                since = 0
                continue
            since += 1
            inside[i, j] = depth > 0
            doctest[i, j] = since <= DOCTEST_SPAN and not gt[i][j]
            depth = max(0, depth + lp[i][j] - rp[i][j])
    return {"digit": f["digit"][w], "word_start": starts, "open_bracket": f["open"][w],
            "inside_parens": inside & letter, "doctest_code": doctest & letter}


# --------------------------------------------------------------------------------- sequence tasks
def docstring_packages(reader, tokenizer) -> tuple[Tensor, Tensor, list[str]] | None:
    """For a store of the built-in stdlib-docstrings corpus harvested by this Python: (the token
    stream the windows were cut from [n_stream], the doc index of every stream position [n_stream],
    the package of every doc); None for any other store."""
    import sysconfig
    from pathlib import Path

    from saekit.data.text import _file_docstrings, corpus_id, stdlib_files
    from saekit.data.tokens import separator_id

    m = reader.manifest
    dataset = (m.get("config") or {}).get("dataset", "")
    if dataset != "builtin:stdlib-docstrings" or m.get("corpus") != corpus_id(dataset):
        return None
    # The corpus is the docstrings file by file, shuffled with random.Random(0) (data/text.py,
    # stdlib_docstrings): the same shuffle of (file, docstring) pairs says where each one came from.
    root = Path(sysconfig.get_paths()["stdlib"])
    pairs = [(path, doc) for path in stdlib_files() for doc in _file_docstrings(path)]
    random.Random(0).shuffle(pairs)
    docs = [doc for _, doc in pairs]
    packages = [path.relative_to(root).parts[0].removesuffix(".py").lstrip("_") for path, _ in pairs]
    ids = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    sep = 1 if separator_id(tokenizer) is not None else 0
    lengths = torch.tensor([len(i) + sep for i in ids])
    doc_of = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    tail = [separator_id(tokenizer)] if sep else []
    stream = torch.tensor([t for i in ids for t in i + tail])
    return stream, doc_of, packages


# ------------------------------------------------------------------------------------- the pass
@torch.no_grad()
def _collect(model, reader, hook: str, rows: tuple[int, int], keep: Tensor, segment: Tensor | None,
             n_segments: int, batch: int, progress: bool):
    """One encoder pass over ``rows``: codes and activations of the rows in ``keep`` (sorted global
    row ids), the per-segment sums of codes and activations, and the activations' mean and covariance
    (for PCA)."""
    from tqdm.auto import tqdm

    n_lat, d = model.n_latents, model.d_in
    keep_codes = torch.zeros(len(keep), n_lat)
    keep_acts = torch.zeros(len(keep), d)
    seg_codes = torch.zeros(n_segments, n_lat)
    seg_acts = torch.zeros(n_segments, d)
    s1, s2, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
    for a in tqdm(range(*rows, batch), desc="probing pass", unit="batch", disable=not progress, leave=False):
        span = (a, min(rows[1], a + batch))
        x = reader.activations(hook, span, dtype=torch.float32)
        code = model.encode(x.to(model.device)).float().cpu()
        lo, hi = torch.searchsorted(keep, torch.tensor(span))
        if hi > lo:
            local = keep[lo:hi] - a
            keep_codes[lo:hi], keep_acts[lo:hi] = code[local], x[local]
        if segment is not None:
            seg = segment[span[0] - rows[0]:span[1] - rows[0]]
            ok = seg >= 0
            seg_codes.index_add_(0, seg[ok], code[ok])
            seg_acts.index_add_(0, seg[ok], x[ok])
        xd = x.double()
        s1 += xd.sum(0)
        s2 += xd.T @ xd
        count += len(x)
    mean = s1 / count
    cov = s2 / count - torch.outer(mean, mean)
    return keep_codes, keep_acts, seg_codes, seg_acts, mean.float(), cov.float()


def _balanced(labels: Tensor, test: Tensor, n: int, gen: torch.Generator, eligible: Tensor | None = None
              ) -> Tensor | None:
    """Indices: up to n/2 positives and as many negatives, drawn within each split (among ``eligible``)."""
    if eligible is not None:
        test = torch.where(eligible, test, torch.full_like(test, 2))  # in neither split
    picked = []
    per_split = {False: n - n // TEST_EVERY, True: n // TEST_EVERY}
    for split, quota in per_split.items():
        split = int(split)
        pos = (labels & (test == split)).nonzero().flatten()
        neg = (~labels & (test == split)).nonzero().flatten()
        if len(pos) < MIN_POSITIVES or len(neg) < MIN_POSITIVES:
            return None
        take = min(quota // 2, len(pos), len(neg))
        picked += [pos[torch.randperm(len(pos), generator=gen)[:take]],
                   neg[torch.randperm(len(neg), generator=gen)[:take]]]
    return torch.cat(picked)


def probe_task(codes: Tensor, acts: Tensor, labels: Tensor, test: Tensor, ks: list[int],
               pca_basis: Tensor, pca_mean: Tensor) -> dict:
    """The held-out accuracies of one binary task (module docstring); codes [n, n_latents], acts [n, d]."""
    train = ~test
    y = labels.bool()
    ks = [k for k in sorted(set(ks))]
    kmax = max(ks)

    def ranked(x):
        pos, neg = x[train & y].mean(0), x[train & ~y].mean(0)
        return (pos - neg).abs().argsort(descending=True)

    sae_rank, raw_rank = ranked(codes), ranked(acts)
    pcs = (acts - pca_mean) @ pca_basis  # [n, n_pca]
    stacks = []
    for source, rank in ((codes, sae_rank), (acts, raw_rank), (pcs, None)):
        for k in ks:
            kk = min(k, source.shape[1])
            cols = rank[:kk] if rank is not None else torch.arange(kk)
            x = torch.zeros(len(y), kmax)
            x[:, :kk] = source[:, cols]
            stacks.append(x)
    x = torch.stack(stacks)  # [3 * len(ks), n, kmax]
    w, b = fit_logistic(x[:, train], y[train].expand(len(stacks), -1), balanced=False)
    acc = accuracy(torch.einsum("pnk,pk->pn", x[:, test], w) + b[:, None], y[test])
    out = {}
    for i, name in enumerate(("sae", "llm", "pca")):
        for j, k in enumerate(ks):
            out[f"{name}_top_{k}_test_accuracy"] = acc[i * len(ks) + j].item()
    for name, x_all in (("sae", codes), ("llm", acts)):
        w, b = fit_logistic(x_all[train], y[train], balanced=False)
        out[f"{name}_test_accuracy"] = accuracy(x_all[test] @ w + b, y[test]).item()
    out["top_latents"] = sae_rank[:kmax].tolist()
    return out


def probing_eval(model, reader, hook: str, rows: tuple[int, int], cfg, tokenizer, progress: bool = False,
                 sequence_tasks: int = 5, batch: int = 4096) -> dict:
    """Every task's probes on the held-out ``rows`` of the store (module docstring)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    seq, pos, tok = reader.token_info(rows)
    uniq, inverse = torch.unique(seq, return_inverse=True)
    windows = torch.stack([reader.sequence(int(s)) for s in uniq])
    labels = {name: lab[inverse, pos] for name, lab in token_labels(tokenizer, windows).items()}
    test_row = seq % TEST_EVERY == 0
    tasks, skipped = {}, []
    for name, lab in labels.items():
        picked = _balanced(lab, test_row, cfg.probing_examples, gen)
        if picked is None:
            skipped.append(name)
        else:
            tasks[name] = picked
    # sequence level: one segment per (window, docstring) pair
    segment, seg_info = None, None
    origin = docstring_packages(reader, tokenizer)
    if origin is not None:
        from saekit.data.tokens import wrapper_ids

        flat, doc_of, packages = origin
        prefix, suffix = wrapper_ids(tokenizer)
        body = reader.manifest["context_size"] - len(prefix) - len(suffix)
        at = (seq * body + pos - len(prefix)).clamp(0, len(flat) - 1)
        if not torch.equal(flat[at], tok):  # not cut from this stream after all: no sequence tasks
            origin = None
    if origin is not None:
        doc = doc_of[at]
        key = seq * (len(packages) + 1) + doc
        seg_keys, segment = torch.unique(key, return_inverse=True)
        seg_doc = seg_keys % (len(packages) + 1)
        seg_seq = seg_keys // (len(packages) + 1)
        seg_pkg = [packages[int(i)] for i in seg_doc]
        seg_info = (seg_seq, seg_pkg)
    keep = torch.unique(torch.cat([rows[0] + t for t in tasks.values()])) if tasks else torch.zeros(0, dtype=torch.long)
    n_seg = 0 if segment is None else int(segment.max()) + 1
    keep_codes, keep_acts, seg_codes, seg_acts, mean, cov = _collect(
        model, reader, hook, rows, keep, segment, n_seg, batch, progress)
    eigvals, eigvecs = torch.linalg.eigh(cov.double())
    ks = list(cfg.probing_k)
    basis = eigvecs[:, eigvals.argsort(descending=True)[:max(ks)]].float()
    results = []
    for name, picked in tasks.items():
        slot = torch.searchsorted(keep, rows[0] + picked)
        r = probe_task(keep_codes[slot], keep_acts[slot], labels[name][picked], test_row[picked], ks, basis, mean)
        results.append({"dataset_name": name, "level": "token", "examples": len(picked),
                        "positives": int(labels[name][picked].sum()), **r})
    if seg_info is not None:
        seg_seq, seg_pkg = seg_info
        sizes = torch.bincount(segment, minlength=n_seg).clamp(min=1)[:, None].float()
        pooled_codes, pooled_acts = seg_codes / sizes, seg_acts / sizes
        seg_test = seg_seq % TEST_EVERY == 0
        counts: dict[str, int] = {}
        for p in seg_pkg:
            counts[p] = counts.get(p, 0) + 1
        for package, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:sequence_tasks]:
            lab = torch.tensor([p == package for p in seg_pkg])
            picked = _balanced(lab, seg_test.long(), cfg.probing_examples, gen, eligible=sizes[:, 0] >= MIN_SEGMENT)
            name = f"package={package}"
            if picked is None:
                skipped.append(name)
                continue
            r = probe_task(pooled_codes[picked], pooled_acts[picked], lab[picked], seg_test[picked], ks, basis, mean)
            results.append({"dataset_name": name, "level": "sequence", "examples": len(picked),
                            "positives": int(lab[picked].sum()), **r})
    return {"tasks": results, "tasks_skipped": skipped, "k": ks, "rows": list(rows),
            "sequence_tasks": "built-in corpus" if seg_info is not None else "not available (not the built-in corpus)",
            **summarize(results, ks)}


def summarize(results: list[dict], ks: list[int]) -> dict:
    """Means over the tasks of every accuracy (None without tasks)."""
    keys = ["llm_test_accuracy", "sae_test_accuracy"] + [f"{n}_top_{k}_test_accuracy" for n in ("llm", "sae", "pca")
                                                         for k in ks]
    return {key: (sum(r[key] for r in results) / len(results) if results else None) for key in keys}

