"""One optimisation step, and the optimiser state as numpy (for the shared checkpoint directory)."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from convert.errors import UserError
from convert.training import TrainConfig
from mnist_grid.tokens import PAD


def loss_fn(model, images, tokens, label_smoothing: float = 0.0, count=None):
    """Next-token cross-entropy, averaged over the non-pad targets; or summed and divided by `count`, the
    global batch's target count, so that data-parallel ranks' losses add up to the global batch's mean."""
    logits = model(images, tokens[:, :-1])
    args = (logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    if count is None:
        return F.cross_entropy(*args, ignore_index=PAD, label_smoothing=label_smoothing)
    return F.cross_entropy(*args, ignore_index=PAD, label_smoothing=label_smoothing, reduction="sum") / count


def target_count(tokens):
    """Non-pad next-token targets: the weight of a rank's share of the global batch."""
    return (tokens[:, 1:] != PAD).sum()


def _check_bf16(device):
    """bf16 autocast works on CUDA (Ampere or newer) and on the CPU; elsewhere try it, and say so if it fails
    rather than silently training in float32."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"--bf16 needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} has none: drop --bf16"
        )
    if device.type in ("cuda", "cpu"):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # autocast disables itself with only a warning on some devices
            with torch.autocast(device.type, dtype=torch.bfloat16):
                x = torch.ones(2, 2, device=device)
                if (x @ x).dtype != torch.bfloat16:
                    raise RuntimeError("matmul did not run in bfloat16")
    except (RuntimeError, TypeError, UserWarning) as e:
        raise UserError(f"--bf16 is not supported on {device} ({e}): drop --bf16") from None


class Trainer:
    """AdamW (bias-corrected, decoupled decay on every parameter), warm-up + cosine, global-norm clipping."""

    def __init__(
        self, model, tc: TrainConfig, device="cpu", bf16: bool = False, world: int = 1, compile: bool | str = False
    ):
        # world > 1: one of `world` data-parallel ranks (torch.distributed initialised); DDP sums gradients.
        # compile: True or "layers" compiles each encoder and decoder layer in place. The layers of a stack are
        # alike, so they share one compiled graph: the cold start costs about one layer of each kind, not the
        # whole model. "model": the whole training forward as one graph (a longer cold start, fusion across the
        # layers). Module names (checkpoints, optimizer state) are unchanged; evaluation runs eager (see _eager).
        if compile not in (False, True, "layers", "model"):
            raise ValueError(f"compile must be False, True, 'layers' or 'model', got {compile!r}")
        self.model, self.tc, self.device, self.world = model, tc, torch.device(device), world
        self.net = model
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.compiled = bool(compile)
        if compile == "model":
            self.net = torch.compile(self.net)
        elif compile:
            for layer in (*model.encoder, *model.decoder):
                layer.compile()
        self.bf16 = bf16
        if bf16:
            _check_bf16(self.device)
        # Fused AdamW: one kernel for all parameters on CUDA, instead of a handful per parameter tensor.
        self.fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(
            model.parameters(),
            lr=tc.lr_at(0),
            betas=tc.betas,
            eps=tc.eps,
            weight_decay=tc.weight_decay,
            fused=self.fused or None,
        )
        self.step_count = 0
        # The weight average (tc.ema > 0): float32 copies of the parameters, started from the weights of the
        # first step (so that weights loaded after construction, as --init does, are the ones averaged).
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in self._named]
        self._ema: list[torch.Tensor] | None = None
        self._raw: list[torch.Tensor] | None = None  # the raw weights while averaged() has them swapped out

    def step(self, images, tokens):
        """Returns (loss, grad norm before clipping) as 0-d tensors (no host sync here)."""
        self.model.train()
        lr = self.tc.lr_at(self.step_count)
        for g in self.opt.param_groups:
            g["lr"] = lr
        images = torch.as_tensor(images).to(self.device, non_blocking=True)
        tokens = torch.as_tensor(tokens).to(self.device, non_blocking=True)
        count = self._sum_over_ranks(target_count(tokens).float()) if self.world > 1 else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = loss_fn(self.net, images, tokens, self.tc.label_smoothing, count)
        self.opt.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; times world, they sum the ranks' shares of the global mean.
        (loss * self.world if self.world > 1 else loss).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip)
        if self.tc.ema and self._ema is None:
            self._ema = [p.detach().float().clone() for p in self._params]
        self.opt.step()
        if self._ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self._ema, self._params, self.tc.ema_weight(self.step_count))
        self.step_count += 1
        loss = loss.detach()
        return (self._sum_over_ranks(loss) if self.world > 1 else loss), norm.detach()

    @staticmethod
    def _sum_over_ranks(x):
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    def _eager(self):
        """Compiled layers run eager inside: no_grad, generation's caches and new batch shapes would each
        compile another graph (and count toward the recompile limit) for a few calls per epoch."""
        if self.compiled and hasattr(torch.compiler, "set_stance"):
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    @torch.no_grad()
    def eval_loss(self, images, tokens) -> float:
        self.model.eval()
        images = torch.as_tensor(images).to(self.device)
        tokens = torch.as_tensor(tokens).to(self.device)
        with self._eager(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return float(loss_fn(self.model, images, tokens))

    @contextlib.contextmanager
    def averaged(self):
        """Inside, the model holds the weights to evaluate and save: the weight average when on (the raw
        weights are put back on the way out), and runs eager."""
        with self._eager():
            if self._ema is None or self._raw is not None:
                yield
                return
            with torch.no_grad():
                self._raw = [p.detach().clone() for p in self._params]
                torch._foreach_copy_(self._params, self._ema)
            try:
                yield
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(self._params, self._raw)
                self._raw = None

    # ---- state for --resume: Adam moments by parameter name, the dropout RNG, and with a weight average
    # the average ("ema.") and the raw weights ("raw."): the checkpoint's model weights are then the average.
    def state(self) -> dict[str, np.ndarray]:
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        for name, p in self.model.named_parameters():
            s = self.opt.state.get(p)
            if s:
                out[f"m.{name}"] = s["exp_avg"].float().cpu().numpy()
                out[f"v.{name}"] = s["exp_avg_sq"].float().cpu().numpy()
        if self._ema is not None:
            raw = self._raw or self._params
            for (name, _), e, p in zip(self._named, self._ema, raw):
                out[f"ema.{name}"] = e.cpu().numpy()
                out[f"raw.{name}"] = p.detach().float().cpu().numpy()
        out["rng.torch"] = torch.get_rng_state().numpy()
        if self.device.type == "cuda":
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        return out

    def load_state(self, state: dict[str, np.ndarray]):
        self.step_count = int(state["step"])
        for name, p in self.model.named_parameters():
            if f"m.{name}" in state:
                self.opt.state[p] = {
                    # fused AdamW keeps its step count on the parameter's device
                    "step": torch.tensor(float(self.step_count), device=p.device if self.fused else None),
                    "exp_avg": torch.from_numpy(state[f"m.{name}"]).to(p.device, p.dtype),
                    "exp_avg_sq": torch.from_numpy(state[f"v.{name}"]).to(p.device, p.dtype),
                }
        if self.tc.ema and all(f"ema.{n}" in state and f"raw.{n}" in state for n, _ in self._named):
            with torch.no_grad():
                for n, p in self._named:
                    p.copy_(torch.from_numpy(state[f"raw.{n}"]))
            self._ema = [torch.tensor(state[f"ema.{n}"], dtype=torch.float32, device=p.device) for n, p in self._named]
        if "rng.torch" in state:
            torch.set_rng_state(torch.from_numpy(state["rng.torch"].astype(np.uint8)))
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(state["rng.cuda"].astype(np.uint8)), self.device)
