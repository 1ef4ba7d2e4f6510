"""``attach``: saved SAEs spliced into a running model at their hooks, as a context manager.

    with attach(lm, sae, hook="blocks.3.hook_resid_post") as run:
        acts = run.features("the cat sat")          # FeatureActs: sparse [T, n_latents] + tokens
        with run.ablate([12, 40], positions=[-1]):  # edits last while the with-block (or until .remove())
            print(run.predictions("the cat sat"))
        print(run.generate("the cat", steer=run.direction(7), coef=4.0))

At each attached hook the activation x becomes, for the SAE's code c = encode(x) and the code c' after
the run's feature edits:

    error_term=True  (default)   x + (decode(c') - decode(c))    = x exactly while nothing is edited
    error_term=False             decode(c')                      the SAE's reconstruction

then any steering vectors at that hook are added. Inside the block, every call of ``lm.model`` sees this
(the run's own methods included); ``backend`` picks HF module hooks or TransformerLens 4's
TransformerBridge, as for capture."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.autoencoders import Autoencoder
from saekit.autoencoders.sae import SparseAutoencoder
from saekit.errors import UserError
from saekit.intervene.edits import Edit, FeatureEdit, VectorEdit, as_index, feature_ids
from saekit.intervene.results import Attribution, FeatureActs, sparse_rows
from saekit.lm import splice
from saekit.lm.capture import check_backend
from saekit.lm.hooks import parse_hooks
from saekit.lm.loading import LoadedLM


def attach(lm: LoadedLM, saes, hook: str | None = None, *, error_term: bool = True,
           backend: str = "hf") -> "Run":
    """Attach ``saes`` to ``lm``: one SAE (an Autoencoder or a saved directory) at ``hook``, or a dict
    {hook: SAE or directory}. Use as ``with attach(...) as run:``; the model is clean again after."""
    check_backend(backend)
    if isinstance(saes, dict):
        if hook is not None:
            raise UserError("pass hook= only with a single SAE; a dict already maps hooks to SAEs")
        pairs = dict(saes)
    else:
        if hook is None:
            raise UserError("attach: name the hook the SAE reads, e.g. hook='blocks.3.hook_resid_post'")
        pairs = {hook: saes}
    return Run(lm, {h: _load(lm, h, s) for h, s in pairs.items()}, error_term, backend)


def _load(lm: LoadedLM, hook: str, sae) -> Autoencoder:
    parse_hooks(lm, [hook])  # UnknownHookError (a UserError) naming the nearest valid hook
    if isinstance(sae, (str, Path)):
        sae = Autoencoder.load(sae, device=lm.device)
    if not isinstance(sae, Autoencoder):
        raise UserError(f"the SAE for {hook} is a {type(sae).__name__}, not a saekit Autoencoder or a directory")
    if sae.predicts_target:
        raise UserError(f"the {sae.kind} at {hook} is a transcoder (it predicts another hook); attach SAEs only")
    if sae.d_in != lm.d_model:
        raise UserError(f"the SAE for {hook} reads {sae.d_in}-dimensional activations but {lm.model_id} has "
                        f"d_model {lm.d_model}")
    return sae.eval()


class _Site:
    """The splice function at one hook."""

    def __init__(self, run: "Run", hook: str, sae: Autoencoder | None):
        self.run, self.hook, self.sae = run, hook, sae

    def __call__(self, act_BTD: Tensor) -> Tensor:
        run = self.run
        edits = [e for e in run.edits if e.hook == self.hook] if run.enabled else []
        out = act_BTD
        sae = self.sae
        if sae is not None:
            B, T, D = act_BTD.shape
            dtype = sae.input_scale.dtype
            x_ND = act_BTD.reshape(B * T, D).to(dtype)
            code_ND = sae.encode(x_ND)
            if run._grad:
                if not x_ND.requires_grad:  # the first SAE of the pass: make its code the leaf
                    code_ND = code_ND.detach().requires_grad_(True)
                run._graph[self.hook] = code_ND
            code_BTN = code_ND.view(B, T, -1)
            if run._record is not None:
                run._record[self.hook] = code_BTN.detach()
            new_BTN = code_BTN
            for e in edits:
                if isinstance(e, FeatureEdit):
                    new_BTN = e.apply(new_BTN)
            if not run.error_term:
                out = sae.decode(new_BTN.reshape(B * T, -1)).view(B, T, D).to(act_BTD.dtype)
            elif run._grad:  # value x (to rounding), gradient through the SAE, error held fixed
                x_hat = sae.decode(code_ND)
                out_ND = sae.decode(new_BTN.reshape(B * T, -1)) + (x_ND - x_hat).detach()
                out = out_ND.view(B, T, D).to(act_BTD.dtype)
            elif new_BTN is not code_BTN:
                out = act_BTD + _delta(sae, new_BTN - code_BTN).to(act_BTD.dtype)
        for e in edits:
            if isinstance(e, VectorEdit):
                out = e.apply(out)
        return out


def _delta(sae: Autoencoder, diff_BTN: Tensor) -> Tensor:
    """decode(c + diff) - decode(c) for a linear decoder, without the bias's rounding."""
    if isinstance(sae, SparseAutoencoder):
        return sae.scale_out(diff_BTN @ sae.W_dec)
    B, T, N = diff_BTN.shape
    zero = diff_BTN.new_zeros(B * T, N)
    return (sae.decode(diff_BTN.reshape(B * T, N)) - sae.decode(zero)).view(B, T, -1)


def _widened(x: Tensor) -> Tensor:
    """float32 at least (half-precision models), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


class Run:
    """An attached model. Methods take one text (or a [T] / [1, T] tensor of token ids)."""

    def __init__(self, lm: LoadedLM, saes: dict[str, Autoencoder], error_term: bool, backend: str):
        self.lm, self.saes, self.error_term, self.backend = lm, saes, error_term, backend
        self.edits: list[Edit] = []
        self.enabled = True  # False: edits are ignored (the "before" of a comparison)
        self._sites = {h: _Site(self, h, s) for h, s in saes.items()}
        self._stack: ExitStack | None = None
        self._record: dict[str, Tensor] | None = None
        self._grad = False
        self._graph: dict[str, Tensor] = {}

    # --- context -------------------------------------------------------------------------------
    def __enter__(self) -> "Run":
        if self._stack is not None:
            raise RuntimeError("this run is already attached")
        self._stack = ExitStack()
        for hook, site in self._sites.items():
            self._stack.enter_context(splice(self.lm, hook, site, backend=self.backend))
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _active(self) -> None:
        if self._stack is None:
            raise UserError("this run is not attached; use it inside `with attach(...) as run:`")

    def _site(self, hook: str | None, need_sae: bool = True) -> _Site:
        if hook is None:
            if len(self.saes) != 1:
                raise UserError(f"several SAEs are attached ({', '.join(self.saes)}); pass hook=")
            hook = next(iter(self.saes))
        if hook not in self._sites:
            if need_sae:
                raise UserError(f"no SAE is attached at {hook}; attached: {', '.join(self.saes) or 'none'}")
            parse_hooks(self.lm, [hook])
            self._sites[hook] = _Site(self, hook, None)
            if self._stack is not None:
                self._stack.enter_context(splice(self.lm, hook, self._sites[hook], backend=self.backend))
        return self._sites[hook]

    # --- edits ---------------------------------------------------------------------------------
    def _feature_edit(self, features, hook, positions, value=None, factor=None) -> FeatureEdit:
        site = self._site(hook)
        ids = feature_ids(features, site.sae.n_latents, site.hook)
        edit = FeatureEdit(site.hook, positions, self.edits, ids, value, factor)
        self.edits.append(edit)
        return edit

    def ablate(self, features, hook: str | None = None, positions=None) -> FeatureEdit:
        """Set ``features`` to 0 (at ``positions``: None = all, ints, a slice or a bool mask)."""
        return self._feature_edit(features, hook, positions, value=0.0)

    def clamp(self, features, value: float, hook: str | None = None, positions=None) -> FeatureEdit:
        """Set ``features`` to ``value``."""
        return self._feature_edit(features, hook, positions, value=float(value))

    def scale(self, features, factor: float, hook: str | None = None, positions=None) -> FeatureEdit:
        """Multiply ``features`` by ``factor``."""
        return self._feature_edit(features, hook, positions, factor=float(factor))

    def direction(self, feature: int, hook: str | None = None) -> Tensor:
        """Feature ``feature``'s decoder direction in raw activation units ([d_model])."""
        site = self._site(hook)
        (j,) = feature_ids(feature, site.sae.n_latents, site.hook)
        one = torch.zeros(1, 1, site.sae.n_latents, dtype=site.sae.input_scale.dtype, device=site.sae.device)
        one[..., j] = 1.0
        with torch.no_grad():
            return _delta(site.sae, one).flatten()

    def steer(self, vector, coef: float = 1.0, hook: str | None = None, positions=None) -> VectorEdit:
        """Add ``coef * vector`` to the output of ``hook`` (any hook of the model; default: the one SAE's).
        ``vector``: a [d_model] tensor or a feature index (its decoder direction)."""
        if as_index(vector) is not None:
            vector = self.direction(as_index(vector), hook)
        site = self._site(hook, need_sae=False)
        vector = torch.as_tensor(vector).flatten()
        if vector.shape[0] != self.lm.d_model:
            raise UserError(f"steering vector has {vector.shape[0]} entries but {self.lm.model_id} has "
                            f"d_model {self.lm.d_model}")
        edit = VectorEdit(site.hook, positions, self.edits, vector.detach(), float(coef))
        self.edits.append(edit)
        return edit

    def clear(self) -> None:
        """Remove every edit."""
        self.edits.clear()

    # --- running -------------------------------------------------------------------------------
    def tokenize(self, text) -> Tensor:
        if isinstance(text, Tensor):
            ids = text.reshape(1, -1) if text.ndim == 1 else text
            if ids.ndim != 2 or ids.shape[0] != 1:
                raise UserError(f"pass one sequence of token ids, got shape {tuple(text.shape)}")
            return ids.to(self.lm.device)
        if not isinstance(text, str):
            raise UserError(f"pass one text (a str), got {type(text).__name__}")
        ids = self.lm.tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise UserError("the text tokenizes to no tokens")
        if ids.shape[1] > self.lm.n_ctx:
            raise UserError(f"the text is {ids.shape[1]} tokens; {self.lm.model_id} takes at most {self.lm.n_ctx}")
        return ids.to(self.lm.device)

    def tokens(self, text) -> list[str]:
        return [self.lm.tokenizer.decode([i]) for i in self.tokenize(text)[0].tolist()]

    def _call(self, ids: Tensor) -> Tensor:
        """Logits [1, T, V] (causal) or the last hidden state [1, T, d] (encoder)."""
        self._active()
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.lm.is_causal:
            kwargs["use_cache"] = False
        out = self.lm.model(**kwargs)
        return out.logits if self.lm.is_causal else out.last_hidden_state

    @torch.no_grad()
    def forward(self, text) -> Tensor:
        """Logits [T, vocab] (causal LM) or the last hidden state [T, d_model] (encoder)."""
        return self._call(self.tokenize(text))[0]

    def embed(self, text) -> Tensor:
        """Sentence embedding [d_model]: mean of the last hidden state over the tokens (encoders)."""
        if self.lm.is_causal:
            raise UserError(f"{self.lm.model_id} is a causal LM; embed() is for encoders, use forward() or predictions()")
        return self.forward(text).mean(0)

    def features(self, text, hook: str | None = None) -> FeatureActs:
        """Per-token activations of the SAE at ``hook`` (default: the only one attached) on ``text``,
        with the run's edits applied upstream of it (its own edits come after it reads the features)."""
        site = self._site(hook)
        ids = self.tokenize(text)
        self._record = {}
        try:
            with torch.no_grad():
                self._call(ids)
            code = self._record[site.hook][0]
        finally:
            self._record = None
        return FeatureActs(site.hook, self.tokens(ids), ids[0].tolist(), sparse_rows(code))

    def predictions(self, text, n: int = 5) -> list[tuple[str, float]]:
        """Top ``n`` next-token predictions after ``text`` as (token, probability) (causal LMs)."""
        self._causal("predictions")
        probs = self.forward(text)[-1].float().softmax(-1)
        p, idx = probs.topk(n)
        return [(self.lm.tokenizer.decode([i]), float(q)) for i, q in zip(idx.tolist(), p.tolist())]

    def compare(self, text, n: int = 5):
        """Before/after table of the top next-token predictions: the run without its edits vs with them."""
        from saekit.intervene.display import Comparison

        self.enabled = False
        try:
            before = self.predictions(text, n)
        finally:
            self.enabled = True
        return Comparison(text, before, self.predictions(text, n))

    def _causal(self, what: str) -> None:
        if not self.lm.is_causal:
            raise UserError(f"{what} needs a causal LM; {self.lm.model_id} is an encoder")

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 20, *, steer=None, coef: float = 1.0,
                 hook: str | None = None, greedy: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, stop_at_eos: bool = True) -> str:
        """Continue ``prompt`` (greedy, or sampled at ``temperature`` / ``top_k``) with the run's edits,
        plus for this call ``coef * steer`` added at ``hook`` (``steer``: a feature index or a vector).
        Returns the generated text (without the prompt). Each step reruns the whole sequence, so edits at
        given positions mean the same on every step."""
        self._causal("generate")
        edit = self.steer(steer, coef, hook) if steer is not None else None
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        try:
            ids = self.tokenize(prompt)
            start = ids.shape[1]
            eos = self.lm.tokenizer.eos_token_id
            for _ in range(max_new_tokens):
                if ids.shape[1] >= self.lm.n_ctx:
                    break
                logits = self._call(ids)[0, -1].float()
                if greedy:
                    nxt = int(logits.argmax())
                else:
                    logits = logits / max(temperature, 1e-6)
                    if top_k is not None:
                        kth = logits.topk(min(top_k, logits.shape[0])).values[-1]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen))
                ids = torch.cat([ids, ids.new_tensor([[nxt]])], 1)
                if stop_at_eos and eos is not None and nxt == eos:
                    break
        finally:
            if edit is not None:
                edit.remove()
        return self.lm.tokenizer.decode(ids[0, start:].tolist())

    # --- attribution -----------------------------------------------------------------------------
    @torch.no_grad()
    def target_value(self, text, target) -> float:
        """The value of ``target`` (see ``attribute``) on ``text``, with the run's current edits."""
        return float(self._target(self._call(self.tokenize(text))[0], target))

    def _target(self, out: Tensor, target) -> Tensor:
        if callable(target):
            return target(out)
        if self.lm.is_causal:
            logits = _widened(out[-1])
            if isinstance(target, tuple):
                a, b = (self._token_id(t) for t in target)
                return logits[a] - logits[b]
            return logits.log_softmax(-1)[self._token_id(target)]
        emb = _widened(out.mean(0))
        if isinstance(target, str):
            # The reference: the other text's embedding with the SAEs attached but without the edits.
            saved = self._grad, self.enabled
            self._grad, self.enabled = False, False
            try:
                ref = _widened(self.embed(target))
            finally:
                self._grad, self.enabled = saved
        else:
            ref = torch.as_tensor(target).to(emb.device, emb.dtype).flatten()
        return F.cosine_similarity(emb, ref, dim=0)

    def _token_id(self, token) -> int:
        if isinstance(token, int):
            vocab = self.lm.model.get_output_embeddings().weight.shape[0]
            if not 0 <= token < vocab:
                raise UserError(f"token id {token} is out of range (vocab size {vocab})")
            return token
        ids = self.lm.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise UserError(f"target token {token!r} is {len(ids)} tokens for this tokenizer; pass one token or an id")
        return ids[0]

    def attribute(self, text, target, dashboard=None) -> Attribution:
        """Each active feature's activation x gradient of ``target``, in one backward pass with every
        SAE's error term held fixed (approximately the target's drop if the feature were ablated).

        ``target``, causal LM: a token (str or id): its next-token log-prob after ``text``; a pair
        (a, b): the logit difference a - b; or a callable on the logits [T, vocab]. Encoder: another
        text (embedded with the SAEs but without the run's edits) or a [d_model] vector: the cosine of ``text``'s embedding with it; or a callable on the
        last hidden state [T, d]. ``dashboard``: the SAE's dashboard directory, to link each top feature
        to its card."""
        if not self.error_term:
            raise UserError("attribution holds the error term fixed; attach with error_term=True")
        ids = self.tokenize(text)
        self._grad, self._graph = True, {}
        try:
            with torch.enable_grad():
                value = self._target(self._call(ids)[0], target)
                hooks = [h for h in self.saes if h in self._graph]
                grads = torch.autograd.grad(value, [self._graph[h] for h in hooks], allow_unused=True)
            scores, acts = {}, {}
            for h, g in zip(hooks, grads):
                code = self._graph[h].detach()
                acts[h] = code.view(ids.shape[1], -1).float().cpu()
                g = torch.zeros_like(code) if g is None else g
                scores[h] = (code * g).view(ids.shape[1], -1).float().cpu()
        finally:
            self._grad, self._graph = False, {}
        return Attribution(float(value.detach()), self.tokens(ids), scores, acts,
                           None if dashboard is None else str(dashboard))
