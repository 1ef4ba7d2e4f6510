"""One trainer for every autoencoder family: ``train(cfg, data=None) -> run_dir``.

    run_dir/ (= cfg.out)
        config.json     the full TrainConfig; a rerun with a different config is refused
        checkpoint/     latest checkpoint (see checkpoint.py); rerunning train() resumes from it
        model/          the final model (model.save; loads with Autoencoder.load, works on raw inputs)
        metrics.json    final training metrics, tokens/s
        loss.png        loss, FVU and L0 against tokens
        wandb/          the W&B run, when cfg.wandb

``train_many(cfgs, data=None) -> [run_dir, ...]`` trains several runs from one pass over the data
(a sweep over kinds, widths, k, ... and/or several hooks of one store): each batch is read, shuffled and
moved to the device once, then fed to every run (a ``Trainer``: its own model, optimizer, schedule,
dead tracker, tracker, checkpoints and run directory). ``train`` is its one-run case. Runs share every
``data`` key except ``hook`` / ``target_hook`` (the store's loader reads the union of their hooks).
Resume is exact from any kill, even between two runs' checkpoint writes: the stream restarts at the
oldest run's position and the runs ahead skip the batches they already took. Under torchrun with
several runs, run i trains on rank i % world_size from whole batches, without DDP.

Gradient-trained models take Adam steps on ``forward(x).loss`` (transcoders, with ``data.target_hook``:
``forward(x, target).loss``, and the logged FVU is the prediction's against the target); closed-form models
(``Autoencoder.closed_form``, e.g. PCA) get ``fit_stream(batches)`` once instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import Tensor

from saekit.autoencoders import Autoencoder, build, registry
from saekit.autoencoders.kernels import keep_freed_memory
from saekit.config import TrainConfig, load_train_configs, resolve_device
from saekit.errors import ConfigError, UserError
from saekit.files import directory_lock, read_json, sha256_file, write_json
from saekit.metrics import FiringStats, Metrics, ReconstructionStats
from saekit.schema import config_diff, from_dict, to_dict
from saekit.training import checkpoint, distributed
from saekit.training.batches import BatchStream, open_store, union_hooks
from saekit.training.data_stats import decoder_bias, input_scale
from saekit.training.dead_latents import DeadTracker
from saekit.training.optimizer import make_adam
from saekit.training.schedule import base_lr, dead_after_tokens, lr_factor, sparsity_scale
from saekit.training.sharded import ShardedTopK
from saekit.training.tracking import Tracker, plot_history

INIT_SAMPLE_TOKENS = 16_384  # tokens (over all ranks) used to set the input scale and decoder bias
HISTORY_COLUMNS = ["step", "tokens", "loss", "fvu", "l0"]
# Keys that may differ when a run is resumed: where it lives (a moved run dir) and what is displayed.
DISPLAY_KEYS = ("out", "progress", "wandb", "wandb_project", "log_every_steps")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became inf/nan; the last checkpoint on disk is left as it was."""


def train(cfg: TrainConfig, data=None) -> Path:
    """Train (or resume, or finish) the run described by ``cfg``; returns the run directory.

    ``data`` is optional: by default batches come from the activation store ``cfg.data.store``. Any
    iterable of [batch, d] float tensors also works; it resumes exactly only if it has
    ``state_dict()`` / ``load_state_dict()``. Under torchrun (WORLD_SIZE > 1) each rank must pass its
    own part of the data, with equal batch sizes on all ranks.
    """
    return Trainer(cfg, data).run()


# Data keys each run of one pass may set for itself; every other data key (and the device) is shared.
OWN_DATA_KEYS = ("hook", "target_hook")


def train_many(cfgs: list[TrainConfig], data=None) -> list[Path]:
    """Train (or resume, or finish) several runs from one pass over the data; returns their run
    directories in order. Finished runs are skipped; closed-form runs (PCA) are fitted one by one
    after the others. ``data`` as for train(): every run gets every batch of it."""
    cfgs = list(cfgs)
    if not cfgs:
        raise ConfigError("train_many: no runs given")
    check_shared(cfgs)
    return OnePass([Trainer(cfg) for cfg in cfgs], data).run()


def train_file(path: str | Path | None, overrides: dict | None = None) -> list[Path]:
    """Train what a train YAML holds: one run, or a sweep (a top-level ``models:`` list) from one pass
    over the data (``load_train_configs``). What ``saekit train`` and ``python -m saekit.training`` do."""
    runs = load_train_configs(path, overrides)
    if len(runs) == 1:
        return [train(runs[0][1])]
    return train_many([cfg for _, cfg in runs])


def check_shared(cfgs: list[TrainConfig]) -> None:
    """The runs of one pass read the same batches: the data keys (but hook, target_hook) and the
    device must agree, and each needs its own run directory."""
    first = cfgs[0]
    keys = [f"data.{f.name}" for f in dataclasses.fields(first.data) if f.name not in OWN_DATA_KEYS]
    for cfg in cfgs[1:]:
        for key in keys + ["device"]:
            a, b = _get(first, key), _get(cfg, key)
            if a != b:
                raise ConfigError(f"config key '{key}' differs between runs trained in one pass ({first.out}: "
                                  f"{a!r}, {cfg.out}: {b!r}); they read the same batches, so set it once for all "
                                  "of them, or train them separately")
    outs = [Path(cfg.out).resolve() for cfg in cfgs]
    twice = sorted({str(o) for o in outs if outs.count(o) > 1})
    if twice:
        raise ConfigError(f"config key 'out' is {twice[0]} for two runs trained in one pass; give each its own")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse a run directory that holds a run with another config, naming the differing keys. A
    directory with no checkpoint and no model holds no run yet (e.g. a start that failed on a bad
    value), so its config.json is simply replaced."""
    path = run_dir / "config.json"
    if not path.exists() or not (checkpoint.find(run_dir) or (run_dir / "model").exists()):
        return
    diff = config_diff(_with_defaults(read_json(path)), json.loads(json.dumps(to_dict(cfg))), DISPLAY_KEYS)
    if diff:
        detail = ", ".join(f"{k} ({was!r} -> {now!r})" for k, was, now in diff)
        raise ConfigError(f"{run_dir} already holds a run with a different config; differing keys: "
                          f"{detail}. Use another `out` directory, or delete this one to start over.")


def _with_defaults(saved: dict) -> dict:
    """A run's saved config.json with the keys added to TrainConfig since it was written set to their
    defaults (what the run used), so a newer saekit still resumes or skips it. A saved config that
    no longer reads (a key since removed) is compared as it is, and the diff names the key."""
    try:
        return json.loads(json.dumps(to_dict(from_dict(TrainConfig, saved))))
    except (ConfigError, TypeError, ValueError):
        return saved


def _wrap_ddp(model: Autoencoder, device: torch.device):
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buffers (input_scale, ...) are set identically on every rank: no broadcast before every forward.
    # (torch >= 2.12 renamed the switch; the old name still works there but warns.)
    new_name = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    buffers = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **buffers)


class Trainer:
    """One run of a pass: its model, optimizer, schedule, dead tracker, metric windows, tracker, run
    directory and checkpoints. ``OnePass`` feeds it batches; ``run()`` trains it alone."""

    def __init__(self, cfg: TrainConfig, data=None):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.data = data
        self.step = self.tokens = 0
        self.history: list[list[float]] = []
        self.tracker: Tracker | None = None
        self.metrics: dict[str, float] = {}  # the last logged training metrics
        self._unchecked = None  # the last step whose loss has not been checked for inf/nan yet
        self.closed_form = registry()[cfg.model.kind].model.closed_form
        self.skip = 0  # batches of the stream this run already trained on (it is ahead of the oldest run)
        self.rng = None  # (cpu, cuda) torch RNG states while other runs share the process (own_rng)
        self.swap_rng = False
        self.done = False
        self.shard: distributed.Dist | None = None  # the real ranks of a latent-sharded run (shard_latents)

    def run(self) -> Path:
        return OnePass([self], self.data).run()[0]

    def attach(self, device: torch.device, dist: distributed.Dist, swap_rng: bool) -> None:
        self.device, self.dist, self.swap_rng = device, dist, swap_rng
        # bf16 autocast over fp32 master weights: by default on CUDA only (on CPU it is slower).
        cfg = self.cfg
        self.autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")

    @contextmanager
    def own_rng(self):
        """This run's torch RNG stream, so runs sharing a process draw exactly what they would alone."""
        if not self.swap_rng:
            yield
            return
        if self.rng is not None:
            torch.set_rng_state(self.rng[0])
            if self.rng[1] is not None:
                torch.cuda.set_rng_state(self.rng[1])
        try:
            yield
        finally:
            self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------------------ run directory
    def open_dir(self) -> bool:
        """Check and claim the run directory and read its checkpoint; False if the run is finished."""
        cfg, d = self.cfg, self.dist
        check_run_dir(self.run_dir, cfg)
        finished = (self.run_dir / "metrics.json").exists() and (self.run_dir / "model").exists()
        distributed.barrier(d)  # everyone has read the old files before rank 0 writes new ones
        if finished:
            if d.is_main:
                print(f"saekit: {self.run_dir} is already trained; nothing to do")
            self.done = True
            return False
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", to_dict(cfg))
        self.ckpt = checkpoint.find(self.run_dir)
        self.meta, self.tensors = checkpoint.load_trainer(self.ckpt) if self.ckpt else (None, None)
        return True

    @property
    def position(self) -> int:
        """Batches of the stream this run has trained on: one per step (on every rank)."""
        return self.meta["step"] if self.meta else 0

    def start(self, stream: BatchStream, pick, move) -> None:
        """Build (from the first batches) or load the model; ``pick(batch)`` takes this run's tensors
        out of a stream batch, ``move(batch)`` puts them on the device."""
        self.stream, self._pick, self._move = stream, pick, move
        with self.own_rng():
            if self.meta is None:
                model, self.sample = self._init_model()
            else:
                checkpoint.verify(self.ckpt, self.meta, "model/")
                model, self.sample = Autoencoder.load(self.ckpt / "model", self.device), None
            model.use_kernels(self.cfg.kernels)
            if self.shard is not None:  # every rank built or loaded the same whole model: keep its slice
                model = ShardedTopK.from_full(model, self.shard)
            self.model = model
            if not self.closed_form:
                self.sample = None  # only the closed-form fit scores on it; the stream still holds them
                self._setup_gradient()

    # ---------------------------------------------------------------------------- initialization
    def _init_model(self) -> tuple[Autoencoder, list]:
        cfg, d = self.cfg, self.dist
        first = [self._pick(b) for b in self.stream.peek(1)]
        if not first:
            raise UserError("the training data is empty (no batch of data.batch_tokens rows); harvest more "
                            "tokens or lower data.batch_tokens")
        pairs = isinstance(first[0], tuple)
        predicts = registry()[cfg.model.kind].model.predicts_target
        if pairs != predicts:
            raise UserError(f"kind '{cfg.model.kind}' trains on (input, target) pairs (data.target_hook) but the "
                            "training data yields single tensors" if predicts else
                            f"the training data yields (input, target) pairs, but kind '{cfg.model.kind}' "
                            "reconstructs its input; pass [batch, d] tensors or use a transcoder")
        batch_tokens = (first[0][0] if pairs else first[0]).shape[0] * d.world_size
        n_batches = max(1, math.ceil(min(INIT_SAMPLE_TOKENS, cfg.total_tokens) / batch_tokens))
        batches = [self._pick(b) for b in self.stream.peek(n_batches)]

        def gathered(part: list[Tensor], what: str) -> Tensor:
            local = torch.cat(part).to(self.device, torch.float32)
            sample = distributed.all_gather_cat(local, d)  # identical sample, hence init, on every rank
            if not torch.isfinite(sample).all():
                raise UserError(f"the first {sample.shape[0]} training tokens contain non-finite values "
                                f"(inf/nan) in the {what}; cannot set the input scale and decoder bias from them")
            return sample

        sample = gathered([b[0] for b in batches] if pairs else batches, "inputs")
        targets = gathered([b[1] for b in batches], "targets") if pairs else None
        model_cfg = cfg.model
        if targets is not None:
            width = targets.shape[1]
            if model_cfg.d_out not in (None, width):
                raise ConfigError(f"config key 'model.d_out' is {model_cfg.d_out}, but the targets "
                                  f"({cfg.data.target_hook}) have width {width}; drop model.d_out or set it to {width}")
            model_cfg = dataclasses.replace(model_cfg, d_out=width)

        torch.manual_seed(cfg.seed)
        model = build(model_cfg, sample.shape[1]).to(self.device)
        with torch.no_grad():
            model.input_scale.fill_(input_scale(sample) if cfg.normalize else 1.0)
            if targets is None:
                model.init_from_data(sample, decoder_bias(sample, cfg.b_dec_init))
            else:
                model.output_scale.fill_(input_scale(targets) if cfg.normalize else 1.0)
                model.init_from_data(sample, decoder_bias(targets, cfg.b_dec_init), target=targets)
        if d.rank:  # ranks share the init but draw different noise (denoising, RBM sampling, ...)
            torch.manual_seed(cfg.seed + 7919 * d.rank)
        return model, batches

    def _next_batch(self) -> tuple[Tensor, Tensor | None] | None:
        """(inputs, targets or None) of the next batch on the device, or None when the data ran out."""
        try:
            batch = next(self.stream)
        except StopIteration:
            self.ran_out()
            return None
        return self.own(self._move(batch))

    def own(self, batch) -> tuple[Tensor, Tensor | None]:
        """(inputs, targets or None): this run's tensors of a stream batch."""
        batch = self._pick(batch)
        return batch if isinstance(batch, tuple) else (batch, None)

    def ran_out(self) -> None:
        warnings.warn(f"the training data ran out after {self.tokens} of {self.cfg.total_tokens} "
                      f"tokens{self._named}; finishing early", stacklevel=3)

    @property
    def _named(self) -> str:
        return f" of {self.run_dir}" if self.swap_rng else ""

    # ------------------------------------------------------------------------------- closed form
    def fit_closed_form(self) -> Path:
        cfg, model, sample = self.cfg, self.model, self.sample
        if self.dist.enabled:
            raise UserError(f"'{cfg.model.kind}' is fitted in closed form in one process; "
                            "run it without torchrun")
        self.tracker = Tracker(cfg, self.run_dir, 0, active=True)
        start = time.perf_counter()

        def batches():
            while self.tokens < cfg.total_tokens:
                batch = self._next_batch()
                if batch is None:
                    return
                x = batch[0]
                self.tokens += x.shape[0]
                self.tracker.advance(x.shape[0])
                yield x

        model.fit_stream(batches())
        elapsed = time.perf_counter() - start
        model.eval()
        metrics = Metrics(model.n_latents)
        with torch.no_grad():
            for x in sample:  # the first training batches: a quick sanity number, not a held-out score
                x = (x[0] if isinstance(x, tuple) else x).to(self.device, torch.float32)
                metrics.update(x, model(x))
        summary = metrics.compute()
        summary["metrics_tokens"] = summary.pop("tokens")
        summary.update(tokens=self.tokens, elapsed_s=elapsed, tokens_per_s=self.tokens / max(elapsed, 1e-9),
                       kind=cfg.model.kind, closed_form=True)
        self.tracker.summary(summary)
        model.save(self.run_dir / "model")
        write_json(self.run_dir / "metrics.json", summary)  # last: marks the run finished
        self.done = True
        return self.run_dir

    # ---------------------------------------------------------------------------------- gradient
    def _setup_gradient(self) -> None:
        cfg, d, model, meta = self.cfg, self.dist, self.model, self.meta
        model.train()
        self.base_lr = base_lr(cfg)
        self.dead_after_tokens = dead_after_tokens(cfg)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on the step's large temporaries (kernels.py)
        self.optimizer = make_adam(model, self.base_lr, tuple(cfg.betas), self.device)
        self.dead = DeadTracker(model.n_latents, self.device)
        self.density = FiringStats(model.n_latents)  # feature density over ~dead_window_tokens
        if meta is not None:
            self._restore(self.ckpt, meta, self.tensors)
        self._reset_window()

        wrapped = _wrap_ddp(model, self.device) if d.enabled else model
        self.forward = torch.compile(wrapped) if cfg.compile else wrapped
        self.tracker = Tracker(cfg, self.run_dir, self.tokens, active=d.is_main,
                               wandb_id=meta.get("wandb_id") if meta else None)

        self.start_time, self.start_tokens = time.perf_counter(), self.tokens

    @property
    def wants_data(self) -> bool:
        return self.tokens < self.cfg.total_tokens

    def feed(self, batch) -> None:
        """One training step on this run's part of ``batch`` (on the device), unless the run already
        took this batch before a resume (``skip``)."""
        if self.skip:
            self.skip -= 1
            return
        cfg = self.cfg
        with self.own_rng():
            before = self.tokens
            x, target = self.own(batch)
            self._step(x) if target is None else self._step(x, target)
            self.tracker.advance(self.tokens - before)
            if cfg.log_every_steps > 0 and self.step % cfg.log_every_steps == 0:
                self._log(time.perf_counter() - self.start_time, self.tokens - self.start_tokens)
            every = cfg.checkpoint_every_tokens
            if every > 0 and self.tokens // every > before // every and self.tokens < cfg.total_tokens:
                self._save_checkpoint()

    def finish(self) -> Path:
        """The final log, checkpoint and outputs (metrics.json last: it marks the run finished)."""
        d = self.dist
        with self.own_rng():
            self._check_finite(self._unchecked)
            elapsed = time.perf_counter() - self.start_time
            if self.window_steps:
                self._log(elapsed, self.tokens - self.start_tokens, final=True)
            self._save_checkpoint()
            whole = self.whole_model()
            if d.is_main:
                self._write_outputs(elapsed, self.tokens - self.start_tokens, whole)
        distributed.barrier(d)
        self.done = True
        return self.run_dir

    def _step(self, x: Tensor, target: Tensor | None = None) -> None:
        cfg, model = self.cfg, self.model
        n_tokens = x.shape[0] * self.dist.world_size
        middle = self.tokens + n_tokens / 2
        lr = self.base_lr * lr_factor(middle, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # (checkpoints from before lr_scale lack it)
        model.set_sparsity_scale(sparsity_scale(middle, cfg))
        model.set_dead_mask(self.dead.dead_mask(self.dead_after_tokens))

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.forward(x) if target is None else self.forward(x, target)
        loss = out.loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.before_optimizer_step()  # gradients are already all-reduced by DDP here
        if cfg.grad_clip > 0:
            if self.shard is not None:  # the norm over every rank's shard
                model.clip_grad_norm_(cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        model.after_optimizer_step()

        with torch.no_grad():
            n = model.n_latents
            # One all-reduce per step carries fire counts, the L0 sum and an inf/nan flag, so every rank
            # holds the same dead tracker and stops together on a bad loss.
            packed = torch.cat([out.fire_counts(n), out.nonzero_per_token().sum().long().view(1),
                                (~torch.isfinite(loss.detach())).long().view(1)])
            distributed.all_reduce_sum(packed, self.dist)
            self.dead.update(packed[:n], n_tokens)
            self.window_firing.add_counts(packed[:n], packed[n], n_tokens)
            self.density.add_counts(packed[:n], packed[n], n_tokens)
            self.window_recon.update(x if target is None else target, out.x_hat.float())
            for name, value in out.losses.items():
                self.window_losses[name] = self.window_losses.get(name, 0.0) + value.detach().float()
        self.window_steps += 1
        self.lr = lr
        self.step += 1
        self.tokens += n_tokens
        # Check the previous step, not this one: reading a flag forces a host sync, and one step of lag
        # keeps the GPU queue full. Checkpoints check the latest step first.
        losses = {k: v.detach() for k, v in out.losses.items()}
        previous, self._unchecked = self._unchecked, (self.step, packed[n + 1], losses)
        self._check_finite(previous)

    def _check_finite(self, entry) -> None:
        if entry is None:
            return
        step, flag, losses = entry
        if flag.item():
            parts = ", ".join(f"{k}={v.detach().float().item():.6g}" for k, v in losses.items())
            ckpt = checkpoint.find(self.run_dir)
            kept = f"the last checkpoint ({ckpt}) is untouched" if ckpt else "no checkpoint was written"
            raise NonFiniteLossError(f"non-finite loss at step {step} (loss parts on rank {self.dist.rank}: "
                                     f"{parts}); training stopped and {kept}")

    # ------------------------------------------------------------------------------------ logging
    def _reset_window(self) -> None:
        self.window_recon = ReconstructionStats()
        self.window_firing = FiringStats(self.model.n_latents)
        self.window_losses: dict[str, Tensor] = {}
        self.window_steps = 0

    def _log(self, elapsed: float, session_tokens: int, final: bool = False) -> None:
        cfg, d = self.cfg, self.dist
        # Loss parts may come and go (e.g. AuxK once latents die); ranks must stack the same names.
        names = sorted({k for ks in distributed.gather_objects(list(self.window_losses), d) for k in ks})
        zero = torch.zeros((), device=self.device)
        losses = torch.stack([self.window_losses.get(k, zero) for k in names]) / self.window_steps
        losses = distributed.all_reduce_sum(losses, d) / d.world_size
        recon = self.window_recon
        if d.enabled:  # merge every rank's sums exactly, in rank order
            parts = distributed.all_gather_list(recon.to_tensor(), d)
            recon = ReconstructionStats.from_tensor(parts[0])
            for part in parts[1:]:
                recon.merge(ReconstructionStats.from_tensor(part))
        metrics = {"loss": losses.sum().item(), **{f"loss/{k}": v for k, v in zip(names, losses.tolist())}}
        metrics.update(recon.compute())
        firing = self.window_firing.compute()
        metrics.update(l0=firing["l0"], dense_fraction=firing["dense_fraction"],
                       dead_fraction=self.dead.dead_fraction(cfg.dead_window_tokens),
                       lr=self.lr, sparsity_scale=sparsity_scale(self.tokens, cfg), tokens=self.tokens,
                       tokens_per_s=session_tokens / max(elapsed, 1e-9))
        histogram = None
        if final or self.density.n >= cfg.dead_window_tokens:
            histogram = self.density.histogram()
            self.density = FiringStats(self.model.n_latents)
        self.history.append([self.step, self.tokens, metrics["loss"], metrics["fvu"], metrics["l0"]])
        self.metrics = metrics
        self.tracker.log(self.step, metrics, histogram)
        self._reset_window()

    def whole_model(self) -> Autoencoder | None:
        """The model to save: a latent-sharded run's shards gathered on the main rank (every rank calls
        this; None elsewhere), else the model itself."""
        return self.model.to_full() if self.shard is not None else self.model

    def _write_outputs(self, elapsed: float, session_tokens: int, whole: Autoencoder) -> None:
        whole.save(self.run_dir / "model")
        summary = {**self.metrics, "step": self.step, "tokens": self.tokens,
                   "tokens_per_s": session_tokens / max(elapsed, 1e-9), "elapsed_s": elapsed,
                   "kind": self.cfg.model.kind, "n_latents": self.model.n_latents, "d_in": self.model.d_in,
                   "dead_window_tokens": min(self.cfg.dead_window_tokens, self.tokens)}
        plot_history(torch.tensor(self.history, dtype=torch.float64).reshape(-1, len(HISTORY_COLUMNS)),
                     HISTORY_COLUMNS, self.run_dir / "loss.png")
        self.tracker.summary(summary)
        write_json(self.run_dir / "metrics.json", summary)  # last: marks the run finished

    # -------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> None:
        self._check_finite(self._unchecked)  # never replace a good checkpoint with a diverged model
        d = self.dist
        data_states = distributed.gather_objects(self.stream.state_dict(), d)
        cuda_rng = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        rng_states = distributed.gather_objects((torch.get_rng_state(), cuda_rng), d)
        step_states = distributed.gather_objects({k: v.cpu() for k, v in self.model.step_state().items()}, d)
        written = self._write_shard_optimizer() if self.shard is not None else None
        whole = self.whole_model()
        if d.is_main:
            density = self.density.fire_counts
            tensors = {
                "dead_idle": self.dead.idle,
                "density_counts": density if density is not None else torch.zeros(self.model.n_latents,
                                                                                   dtype=torch.long),
                "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, len(HISTORY_COLUMNS)),
            }
            for rank, state in enumerate(step_states):  # per rank: each decides its own path
                tensors.update({f"step_state.{rank}.{k}": v for k, v in state.items()})
            for rank, (cpu, cuda) in enumerate(rng_states):
                tensors[f"rng_cpu.{rank}"] = cpu
                if cuda is not None:
                    tensors[f"rng_cuda.{rank}"] = cuda
            meta = {"step": self.step, "tokens": self.tokens, "world_size": d.world_size,
                    "data_state": data_states, "wandb_id": self.tracker.wandb_id if self.tracker else None,
                    "density_tokens": self.density.n, "density_nonzero": int(self.density.nonzero or 0),
                    "history_columns": HISTORY_COLUMNS, "kind": self.cfg.model.kind,
                    "metrics": self.metrics, "shard_ranks": self.shard.world_size if self.shard else 1}

            directory = self.run_dir / checkpoint.TMP if written is not None else checkpoint.begin(self.run_dir)
            whole.save(directory / "model")
            if written is None:
                checkpoint.save_optimizer(directory, self.optimizer)
            checkpoint.save_trainer(directory, meta, tensors, written)
            checkpoint.commit(self.run_dir)
        distributed.barrier(self.shard or d)

    def _write_shard_optimizer(self) -> dict[str, str]:
        """A latent-sharded run: each rank writes its own Adam state into the checkpoint being written
        (the main rank starts it), so no rank holds another's; returns every rank's files' sha256."""
        if self.shard.is_main:
            checkpoint.begin(self.run_dir)
        distributed.barrier(self.shard)
        tmp = self.run_dir / checkpoint.TMP
        names = checkpoint.save_optimizer(tmp, self.optimizer, f"optimizer.rank{self.shard.rank}")
        mine = {name: sha256_file(tmp / name) for name in names}
        return {name: sha for part in distributed.gather_objects(mine, self.shard) for name, sha in part.items()}

    def _restore(self, ckpt: Path, meta: dict, tensors: dict[str, Tensor]) -> None:
        d = self.dist
        if meta["world_size"] != d.world_size:
            raise UserError(f"{ckpt} was written by {meta['world_size']} processes; resume it with the "
                             f"same number (this run has {d.world_size})")
        ranks = self.shard.world_size if self.shard else 1
        if meta.get("shard_ranks", 1) != ranks:
            raise UserError(f"{ckpt} was written by a run with its latents split over {meta.get('shard_ranks', 1)} "
                            f"ranks; resume it with the same number and shard_latents (this run: {ranks})")
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.history = tensors["history"].tolist()
        self.metrics = meta.get("metrics", {})
        self.dead.idle = tensors["dead_idle"].to(self.device)
        self.dead.tokens = self.tokens
        if meta["density_tokens"]:
            self.density.add_counts(tensors["density_counts"].to(self.device),
                                    torch.tensor(meta["density_nonzero"], device=self.device),
                                    meta["density_tokens"])
        prefix = f"step_state.{d.rank}."
        self.model.load_step_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        checkpoint.load_optimizer(ckpt, self.optimizer,
                                  f"optimizer.rank{self.shard.rank}" if self.shard else "optimizer", meta)
        self.stream.load_state_dict(meta["data_state"][d.rank])
        # Last: loading the model above drew random numbers (its fresh init before the weights landed).
        torch.set_rng_state(tensors[f"rng_cpu.{d.rank}"])
        if f"rng_cuda.{d.rank}" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors[f"rng_cuda.{d.rank}"])


class OnePass:
    """Trains ``members`` (Trainers) from one stream of batches: each batch is read and moved to the
    device once, then fed to every member that still wants data, in order."""

    def __init__(self, members: list[Trainer], data=None):
        self.members, self.data = members, data

    def run(self) -> list[Path]:
        device = resolve_device(self.members[0].cfg.device)
        d = distributed.setup(device)
        try:
            if device.type == "cuda" and d.enabled:
                device = torch.device("cuda", d.local_rank)
            # Several runs under torchrun: dealt to ranks, each trained whole on its rank (no DDP, whole
            # batches). One run: data parallel over the ranks, as always.
            shard = d.enabled and any(m.cfg.shard_latents for m in self.members)
            if shard and len(self.members) > 1:
                raise ConfigError("shard_latents splits one run's latents over the ranks; train the runs of "
                                  "a sweep one by one with it, or without it (then the ranks share the runs)")
            deal = d.enabled and len(self.members) > 1
            mine = [m for i, m in enumerate(self.members) if not deal or i % d.world_size == d.rank]
            local = distributed.Dist() if deal else d
            if shard:
                local = distributed.RankView(main=d.is_main)
                mine[0].shard = d
            for m in mine:
                m.attach(device, local, swap_rng=len(mine) > 1)
            gradient = [m for m in mine if not m.closed_form]
            groups = ([gradient] if gradient else []) + [[m] for m in mine if m.closed_form]
            failed: list[str] = []
            for group in groups:
                failed += self._run_group(group, device)
            distributed.barrier(d)  # no rank tears the group down while another still writes or talks
            if failed:
                raise NonFiniteLossError(f"{len(failed)} of {len(mine)} runs stopped on a non-finite loss "
                                         f"(the others finished): " + "; ".join(failed))
        finally:
            distributed.teardown(d)
        return [m.run_dir for m in self.members]

    def _run_group(self, group: list[Trainer], device: torch.device) -> list[str]:
        """Train one group from one stream; returns the errors of members that diverged (when the
        group has several: the others go on)."""
        with ExitStack() as stack:
            for m in group:  # the run dir's lock: a second training into it is refused with our PID
                if m.dist.is_main:
                    stack.enter_context(directory_lock(m.run_dir, "train"))
            try:
                todo = [m for m in group if m.open_dir()]
                if not todo:
                    return []
                return self._train(todo, device)
            finally:
                for m in group:
                    if m.tracker is not None:
                        m.tracker.close(not m.done)

    def _train(self, todo: list[Trainer], device: torch.device) -> list[str]:
        d = todo[0].dist
        stream, pick = self._open_stream(todo, d, device)
        # Exact resume: restart at the oldest member's position; members ahead skip what they took.
        oldest = min(todo, key=lambda m: m.position)
        if oldest.meta is not None:
            stream.load_state_dict(oldest.meta["data_state"][d.rank])
        for m in todo:
            m.skip = m.position - oldest.position
        if self.data is not None and not stream.resumable and not any(m.meta for m in todo) and any(
                m.cfg.checkpoint_every_tokens for m in todo):
            warnings.warn("training from a plain iterable: checkpoints save the model and optimizer but "
                          "not the data position, so a resumed run will not see the same data", stacklevel=4)

        def move(batch):
            return _each(lambda t: t.to(device, torch.float32, non_blocking=True), batch)

        for m in todo:
            m.start(stream, lambda batch, m=m: pick(m, batch), move)
        if todo[0].closed_form:
            todo[0].fit_closed_form()
            return []
        active, failed = [], []
        for m in todo:  # a kill between a run's last checkpoint and its outputs leaves nothing to train
            m.finish() if not m.wants_data else active.append(m)
        while active:
            try:
                batch = move(next(stream))
            except StopIteration:
                for m in active:
                    m.ran_out()
                    m.finish()
                break
            for m in list(active):
                try:
                    m.feed(batch)
                except NonFiniteLossError as err:
                    if len(todo) == 1:
                        raise
                    warnings.warn(f"{m.run_dir}: {err}; the other runs go on", stacklevel=2)
                    failed.append(f"{m.run_dir}: {err}")
                    active.remove(m)
                    continue
                if not m.wants_data:
                    m.finish()
                    active.remove(m)
        return failed

    def _open_stream(self, todo: list[Trainer], d: distributed.Dist, device: torch.device):
        """The shared BatchStream, and ``pick(member, batch)`` taking a member's tensors out of a batch."""
        if self.data is not None:
            return BatchStream(self.data), lambda m, batch: batch
        if len(self.members) == 1:  # exactly the single run's loader (and checkpointed state)
            return BatchStream(open_store(todo[0].cfg, d.rank, d.world_size, device)), lambda m, batch: batch
        hooks = union_hooks([m.cfg.data for m in todo])
        source = open_store(todo[0].cfg, d.rank, d.world_size, device, hooks=hooks)

        def pick(m: Trainer, batch):
            if not isinstance(batch, dict):
                return batch
            data = m.cfg.data
            return batch[data.hook] if data.target_hook is None else (batch[data.hook], batch[data.target_hook])

        return BatchStream(source), pick


def _each(fn, batch):
    """``fn`` applied to every tensor of a batch: a tensor, a pair, or a dict of hooks."""
    if isinstance(batch, dict):
        return {k: fn(t) for k, t in batch.items()}
    return tuple(fn(t) for t in batch) if isinstance(batch, tuple) else fn(batch)
