"""Read a trained autoencoder's features off a store: statistics, contexts, lens, search, dashboard.

``FeatureReport.build(run_dir)`` makes one streaming pass over the store (memory O(latents x examples))
and then answers questions cheaply: ``card(latent)`` (shows itself in Jupyter), ``search("token")``,
``write_html(path)``. ``analyze_run(cfg)`` is what ``saekit analyze`` calls.

A transcoder's latents are read off its *input* hook (``data.hook``: the contexts shown are the ones
that make a latent fire), its lens reads the decoder row (the direction the latent adds to the
predicted MLP output), and its worst tokens are those whose target (``data.target_hook``) it predicts
worst.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from saekit.analysis.anomaly import worst_contexts
from saekit.analysis.dashboard import Example, FeatureCard, anomaly_html, write_dashboard
from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator
from saekit.autoencoders import Autoencoder
from saekit.config import AnalyzeConfig, TrainConfig, resolve_device
from saekit.data.store import StoreReader
from saekit.data.tokens import continuation_prefix
from saekit.errors import UserError
from saekit.files import read_json
from saekit.lm import load_manifest_lm, load_manifest_tokenizer, unembedding
from saekit.schema import from_dict


def run_config(run: str | Path) -> TrainConfig:
    """The TrainConfig of a training run directory."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise UserError(f"{run}: not a training run directory (no config.json); pass RUN_DIR of `saekit train`")
    return from_dict(TrainConfig, read_json(run / "config.json"), where=f"{run}/config.json: ")


def run_paths(run: str | Path, store: str | None = None) -> tuple[Path, Path, str]:
    """(model dir, store dir, hook) of a training run directory (its config.json is a TrainConfig)."""
    cfg = run_config(run)
    return Path(run) / "model", Path(store or cfg.data.store), cfg.data.hook


@torch.inference_mode()
def encode_rows(model: Autoencoder, reader: StoreReader, hook: str, rows: Tensor, batch: int = 4096) -> Tensor:
    """Dense codes [len(rows), n] of the given store rows."""
    out = [model.encode(reader.activations(hook, rows=rows[i:i + batch]).to(model.device)).float().cpu()
           for i in range(0, len(rows), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.n_latents)


@dataclass
class FeatureReport:
    model: Autoencoder
    reader: StoreReader
    hook: str
    stats: FeatureStats
    context: int = 8
    quantile_bins: int = 4
    target_hook: str | None = None  # transcoders: the hook they predict (for the worst-predicted tokens)

    @classmethod
    def build(cls, run: str | Path, store: str | None = None, max_tokens: int | None = None,
              batch_tokens: int = 4096, top_examples: int = 20, n_sample: int = 50, context: int = 8,
              device: str = "auto", progress: bool = True) -> "FeatureReport":
        model_dir, store_dir, hook = run_paths(run, store)
        dev = resolve_device(device)
        model = Autoencoder.load(model_dir, device=dev).eval()
        reader = StoreReader(store_dir)
        n = reader.n_rows if max_tokens is None else min(max_tokens, reader.n_rows)
        acc = FeatureStatsAccumulator(model.n_latents, top_k=top_examples, n_sample=n_sample, device=dev)
        from tqdm.auto import tqdm

        with torch.inference_mode(), tqdm(total=n, unit="tok", unit_scale=True, desc="analyze",
                                          disable=not progress) as bar:
            for start in range(0, n, batch_tokens):
                stop = min(n, start + batch_tokens)
                x = reader.activations(hook, rows=(start, stop)).to(dev)
                rows = torch.arange(start, stop, device=dev)
                if model.sparse_encoder:  # TopK: stay O(B*k), never form [B, n]
                    idx_BK, val_BK = model.encode_sparse(x)
                    b = torch.arange(len(x), device=dev)[:, None].expand_as(idx_BK)
                    nz = val_BK != 0
                    acc.update_sparse(b[nz], idx_BK[nz], val_BK[nz], rows, len(x))
                else:
                    acc.update(model.encode(x), rows)
                bar.update(stop - start)
        return cls(model, reader, hook, acc.result(), context, target_hook=run_config(run).data.target_hook)

    # --- tokens -------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        return load_manifest_tokenizer(self.reader.manifest)

    def token_str(self, ids) -> list[str]:
        return [self._token_strings[int(i)] if int(i) in self._token_strings else self._decode(int(i))
                for i in ids]

    @cached_property
    def _token_strings(self) -> dict[int, str]:
        return {}

    def _decode(self, token_id: int) -> str:
        """A token as it reads inside running text: WordPiece word starts get their leading space and
        continuations lose the '##'; byte-level BPE and SentencePiece spell their spaces themselves."""
        tok = self.tokenizer.convert_ids_to_tokens([token_id])[0]
        prefix = continuation_prefix(self.tokenizer)
        if tok is None:
            text = "?"
        elif prefix is None or token_id in self.tokenizer.all_special_ids:
            text = self.tokenizer.convert_tokens_to_string([tok])
        else:
            text = tok[len(prefix):] if tok.startswith(prefix) else " " + tok
        self._token_strings[token_id] = text
        return text

    @cached_property
    def _row_keys(self) -> Tensor:
        """seq * ctx + pos for every row, ascending: maps a (seq, pos) back to its row."""
        seq, pos, _ = self.reader.token_info(torch.arange(self.reader.n_rows))
        return seq * self.reader.context_size + pos.long()

    # --- examples ------------------------------------------------------------------------------------
    def latent_acts(self, rows: Tensor, latents: Tensor) -> Tensor:
        """Activation of ``latents[i]`` on store row ``rows[i]`` for many pairs: one encode per unique row."""
        uniq, inv = torch.unique(rows, return_inverse=True)
        out = torch.zeros(len(rows))
        for start in range(0, len(uniq), 4096):
            code = encode_rows(self.model, self.reader, self.hook, uniq[start:start + 4096])
            sel = (inv >= start) & (inv < start + 4096)
            out[sel] = code[inv[sel] - start, latents[sel]]
        return out

    def examples(self, specs: list[tuple[int, int, float]]) -> list[Example]:
        """(latent, row, activation) triples -> context windows with the latent's activation on every
        stored token of the window; all windows are encoded together."""
        if not specs:
            return []
        seq, pos, _ = self.reader.token_info(torch.tensor([r for _, r, _ in specs], dtype=torch.long))
        windows = [self.reader.context(s, p, self.context, self.context) for s, p in zip(seq.tolist(), pos.tolist())]
        ctx = self.reader.context_size
        keys = torch.cat([s * ctx + torch.arange(p - c, p - c + len(ids))
                          for (ids, c), s, p in zip(windows, seq.tolist(), pos.tolist())])
        lats = torch.cat([torch.full((len(ids),), lat) for (ids, _), (lat, _, _) in zip(windows, specs)])
        idx = torch.searchsorted(self._row_keys, keys).clamp(max=len(self._row_keys) - 1)
        stored = self._row_keys[idx] == keys  # special tokens have no row: they show activation 0
        acts = torch.zeros(len(keys))
        acts[stored] = self.latent_acts(idx[stored], lats[stored])
        out, start = [], 0
        for (ids, center), (_, _, a) in zip(windows, specs):
            out.append(Example(self.token_str(ids), acts[start:start + len(ids)].tolist(), center, a))
            start += len(ids)
        return out

    def cards(self, latents: list[int], n_top: int = 10, quantile_bins: int | None = None,
              per_bin: int = 3) -> list[FeatureCard]:
        st = self.stats
        quantile_bins = quantile_bins or self.quantile_bins
        plans, specs = [], []  # per card: (top slice, [(title, slice)]) into one list of example specs
        for latent in latents:
            ok = st.top_row[latent] >= 0
            top = list(zip(st.top_row[latent][ok][:n_top].tolist(), st.top_val[latent][ok][:n_top].tolist()))
            top_slice = slice(len(specs), len(specs) + len(top))
            specs += [(latent, r, v) for r, v in top]
            bins = []
            for i, group in enumerate(st.quantile_examples(latent, quantile_bins, per_bin)):
                title = f"sampled, quantile bin {i + 1}/{quantile_bins} (act >= {group[-1][0]:.3g})"
                bins.append((title, slice(len(specs), len(specs) + len(group))))
                specs += [(latent, r, v) for v, r in group]
            plans.append((latent, top_slice, bins))
        examples = self.examples(specs)
        return [self._card(latent, examples[top], [(t, examples[s]) for t, s in bins])
                for latent, top, bins in plans]

    def card(self, latent: int, **kw) -> FeatureCard:
        return self.cards([latent], **kw)[0]

    def _card(self, latent: int, top: list[Example], quantiles) -> FeatureCard:
        st = self.stats
        sample = st.sample_val[latent][st.sample_row[latent] >= 0]
        counts, edges = (torch.histogram(sample, bins=20) if len(sample) else (torch.zeros(0), torch.zeros(1)))
        lens_title, pos, neg = self.lens(latent)
        return FeatureCard(latent, float(st.density[latent]), float(st.max_act[latent]),
                           float(st.mean_act[latent]), top, quantiles, lens_title, pos, neg,
                           edges.tolist(), counts.long().tolist())

    # --- logit lens -----------------------------------------------------------------------------------
    @cached_property
    def _lens(self) -> tuple[str, Tensor | None]:
        """(title, [d, vocab] matrix): the unembedding, or for encoders the input embeddings (cosine)."""
        lm = load_manifest_lm(self.reader.manifest)
        w = unembedding(lm)
        of = " of the predicted output (decoder row)" if self.model.predicts_target else ""
        if w is not None:
            return f"logit lens{of}", w.detach().float()
        emb = lm.model.get_input_embeddings().weight.detach().float()
        return f"embedding lens{of} (no unembedding: cosine with input embeddings)", \
            torch.nn.functional.normalize(emb, dim=-1).T

    @cached_property
    def directions(self) -> Tensor:
        """[n, d] what each latent adds to the reconstruction, in raw units (exact for linear decoders); a
        transcoder's decode is its dictionary part, so these are its decoder rows in target units."""
        with torch.inference_mode():
            m = self.model
            eye = torch.eye(m.n_latents, device=m.device)
            return (m.decode(eye) - m.decode(torch.zeros(1, m.n_latents, device=m.device))).float().cpu()

    def lens(self, latent: int, k: int = 8) -> tuple[str, list, list]:
        title, w = self._lens
        scores = self.directions[latent] @ w
        top, bottom = scores.topk(k), (-scores).topk(k)
        pos = list(zip(self.token_str(top.indices), top.values.tolist()))
        neg = list(zip(self.token_str(bottom.indices), (-bottom.values).tolist()))
        return title, pos, neg

    # --- search ----------------------------------------------------------------------------------------
    def search(self, text: str, k: int = 10) -> list[tuple[int, float]]:
        """Latents with the highest mean activation on the token(s) of ``text`` across the store."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        _, _, tok = self.reader.token_info(torch.arange(self.reader.n_rows))
        rows = torch.isin(tok, torch.tensor(ids, dtype=tok.dtype)).nonzero().flatten()[:20_000]
        if len(rows) == 0:
            return []
        mean = encode_rows(self.model, self.reader, self.hook, rows).mean(0)
        top = mean.topk(min(k, len(mean)))
        return list(zip(top.indices.tolist(), top.values.tolist()))

    # --- choosing and exporting ---------------------------------------------------------------------
    def pick_features(self, n: int) -> list[int]:
        """``n`` live latents spread evenly over the density ranking (a representative sample)."""
        live = (self.stats.fire_count > 0).nonzero().flatten()
        order = live[torch.argsort(self.stats.density[live], descending=True)]
        if len(order) <= n:
            return order.tolist()
        return order[torch.linspace(0, len(order) - 1, n).long()].tolist()

    def write_html(self, path: str | Path, latents: list[int], title: str = "saekit features",
                   summary: dict | None = None, worst: int = 0) -> Path:
        cards = self.cards(latents)
        st = self.stats
        target = {"target hook (predicted)": self.target_hook} if self.target_hook else {}
        summary = {"store": str(self.reader.directory),
                   "hook": self.hook, **target, "tokens analyzed": st.n_tokens, "latents": self.model.n_latents,
                   "never active": f"{float((st.fire_count == 0).float().mean()):.2%}", **(summary or {})}
        sections = []
        if worst:
            entries = worst_contexts(self.model, self.reader, self.hook, top=worst,
                                     rows=(0, st.n_tokens), tokenizer=self.tokenizer, target_hook=self.target_hook)
            for entry in entries:  # word pieces as running text, like the cards
                entry["context"] = self.token_str(entry["ids"])
            what = "predicted" if self.target_hook else "reconstructed"
            sections.append((f"Worst-{what} tokens (squared error, top {worst})", anomaly_html(entries)))
        return write_dashboard(cards, path, title, summary, sections)


def analyze_run(cfg: AnalyzeConfig) -> Path:
    report = FeatureReport.build(cfg.run, cfg.store, cfg.max_tokens, cfg.batch_tokens, cfg.top_examples,
                                 context=cfg.context_tokens, device=cfg.device, progress=cfg.progress)
    report.quantile_bins = cfg.quantile_bins
    out = Path(cfg.out or Path(cfg.run) / "dashboard")
    return report.write_html(out / "index.html", report.pick_features(cfg.max_features),
                             title=f"saekit features: {Path(cfg.run).name}", worst=cfg.worst_tokens)
