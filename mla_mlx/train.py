"""One optimisation step, and the optimiser state as numpy (for the shared checkpoint directory)."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from convert.training import TrainConfig
from mnist_grid.tokens import PAD

from .attention import backward_layout


def loss_fn(model, images, tokens, label_smoothing: float = 0.0, count=None, mask=None):
    """Next-token cross-entropy, averaged over the non-pad targets; or summed and divided by `count`, the
    global batch's target count, so that data-parallel ranks' losses add up to the global batch's mean.
    mask: target_mask(tokens), when it is made outside (the compiled step takes it as an input)."""
    logits = model(images, tokens[:, :-1])
    mask = target_mask(tokens) if mask is None else mask
    # MLX's cross_entropy has no ignore_index: pad targets get weight 0 (PAD is a class of the vocabulary, so
    # they need no replacing first).
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:], label_smoothing=label_smoothing)
    return (ce * mask).sum() / (mask.sum() if count is None else count)


def target_mask(tokens):
    """1.0 where a next-token target is not a pad, as float32."""
    return (tokens[:, 1:] != PAD).astype(mx.float32)


def clip_grad_norm(grads, max_norm: float):
    """optim.clip_grad_norm's function (torch's too: max_norm / (norm + 1e-6), at most 1). The squared sums are
    stacked and summed at once: MLX's version adds them one by one, a chain the compiled step turns into fused
    kernels built at run time on the CUDA backend."""
    leaves = [g for _, g in tree_flatten(grads)]
    norm = mx.sqrt(mx.stack([mx.sum(mx.square(g)) for g in leaves]).sum())
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale, grads), norm


def sum_over_ranks(tree):
    """All-sum a tree of float32 arrays across ranks as one flat buffer: one collective, not one per leaf."""
    leaves = tree_flatten(tree)
    flat = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in leaves]))
    parts = mx.split(flat, np.cumsum([v.size for _, v in leaves])[:-1].tolist())
    return tree_unflatten([(k, part.reshape(v.shape)) for (k, v), part in zip(leaves, parts)])


def bf16_loss_fn(model, *args):
    """loss_fn with the forward in bfloat16: the float32 parameters are cast inside the differentiated function,
    so their gradients come back float32 (the master weights and Adam moments stay float32)."""
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.trainable_parameters()))
    return loss_fn(model, *args)  # the model casts its input to its weights' dtype; logits -> float32 loss


def _node(tree, name: str):
    """The entry of a nested dict/list tree (optimizer state) at a dotted parameter name."""
    for part in name.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


class Trainer:
    """AdamW (bias-corrected, decoupled decay on every parameter), warm-up + cosine, global-norm clipping."""

    def __init__(self, model, tc: TrainConfig, device=None, bf16: bool = False, world: int = 1):
        # device: MLX runs on mx.default_device(); bf16: compute in bfloat16 (MLX has no autocast: bf16_loss_fn).
        # world > 1: one of `world` data-parallel ranks (mx.distributed initialised); gradients are summed.
        self.model, self.tc, self.device, self.world = model, tc, device, world
        self.bf16 = bf16
        self.pad_attention = bf16  # backward_layout while the step is traced (off: scripts/kernel_table.py --unpadded)
        forward = bf16_loss_fn if bf16 else loss_fn
        self.opt = optim.AdamW(
            learning_rate=tc.lr_at(0),
            betas=list(tc.betas),
            eps=tc.eps,
            weight_decay=tc.weight_decay,
            bias_correction=True,
        )
        self.opt.init(model.trainable_parameters())  # the compiled step needs the whole state tree up front
        self.step_count = 0
        # The weight average (tc.ema > 0): "params" (float32, the trainable tree) and "weight" (this step's
        # 1 - decay), updated inside the compiled step. "params" starts from the weights of the first step (so
        # that weights loaded after construction, as --init does, are the ones averaged).
        self._ema: dict = {}
        self._raw = None  # the raw weights while averaged() has them swapped out
        self._state = state = [model.state, self.opt.state, mx.random.state, self._ema]

        def train_step(images, tokens, mask):
            count = mx.distributed.all_sum(mask.sum()) if world > 1 else None
            params = model.trainable_parameters()
            loss, grads = nn.value_and_grad(model, forward)(model, images, tokens, tc.label_smoothing, count, mask)
            if bf16:
                model.update(params)  # the float32 master weights back in place of the bf16 copies, for the update
            if world > 1:  # each rank's share of the global mean, summed: the global batch's loss and gradients
                loss, grads = sum_over_ranks((loss, grads))
            grads, norm = clip_grad_norm(grads, tc.clip)
            self.opt.update(model, grads)
            if tc.ema:
                w = self._ema["weight"]
                self._ema["params"] = tree_map(
                    lambda e, p: e + w * (p - e), self._ema["params"], model.trainable_parameters()
                )
            return loss, norm

        # The update stays per array inside the compiled step: one flat buffer per dtype (concatenated grads,
        # split views back into the model) measured 2-4x slower for clip + AdamW on the CPU (small and seed).
        self._step = mx.compile(train_step, inputs=state, outputs=state)

    def step(self, images, tokens):
        """Returns (loss, grad norm before clipping) as 0-d arrays (lazy: no host sync here)."""
        self.model.train()
        # Part of the optimizer state, so the compiled step reads the new value without recompiling.
        self.opt.learning_rate = self.tc.lr_at(self.step_count)
        if self.tc.ema:
            if "params" not in self._ema:
                self._ema["params"] = tree_map(lambda p: p.astype(mx.float32), self.model.trainable_parameters())
            self._ema["weight"] = mx.array(self.tc.ema_weight(self.step_count), dtype=mx.float32)
        images = mx.array(images)
        tokens = mx.array(tokens)
        with backward_layout(self.pad_attention):  # read while the step is traced (its first call)
            # The mask outside the compiled step: its comparison then runs a built-in kernel, not one built at run
            # time on the CUDA backend.
            loss, norm = self._step(images, tokens, target_mask(tokens))
        # Start the step now and return: the host draws the next batch while the GPU runs this one (torch's
        # CUDA queue does the same by itself). Unevaluated, the step would wait for the next read of the loss.
        mx.async_eval(loss, norm, self._state)
        self.step_count += 1
        return loss, norm

    def eval_loss(self, images, tokens) -> float:
        self.model.eval()
        images = mx.array(images)
        tokens = mx.array(tokens)
        if not self.bf16:
            return float(loss_fn(self.model, images, tokens))
        params = self.model.trainable_parameters()
        try:
            return float(bf16_loss_fn(self.model, images, tokens))
        finally:
            self.model.update(params)

    @contextlib.contextmanager
    def averaged(self):
        """Inside, the model holds the weights to evaluate and save: the weight average when on (the raw
        weights are put back on the way out)."""
        if "params" not in self._ema or self._raw is not None:
            yield
            return
        self._raw = self.model.trainable_parameters()
        self.model.update(self._ema["params"])
        try:
            yield
        finally:
            self.model.update(self._raw)
            self._raw = None

    # ---- state for --resume: Adam moments by parameter name, the dropout RNG, and with a weight average
    # the average ("ema.") and the raw weights ("raw."): the checkpoint's model weights are then the average.
    def state(self) -> dict[str, np.ndarray]:
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        if self.step_count:  # torch has no moments before its first step
            for name, _ in tree_flatten(self.model.trainable_parameters()):
                s = _node(self.opt.state, name)
                out[f"m.{name}"] = np.array(s["m"].astype(mx.float32))
                out[f"v.{name}"] = np.array(s["v"].astype(mx.float32))
        if "params" in self._ema:
            raw = dict(tree_flatten(self._raw or self.model.trainable_parameters()))
            for name, e in tree_flatten(self._ema["params"]):
                out[f"ema.{name}"] = np.array(e)
                out[f"raw.{name}"] = np.array(raw[name].astype(mx.float32))
        out["rng.mlx"] = np.array(mx.random.state[0], dtype=np.uint32)
        return out

    def load_state(self, state: dict[str, np.ndarray]):
        # Mutated in place: the compiled step holds references to these very containers.
        self.step_count = int(state["step"])
        self.opt.state["step"] = mx.array(self.step_count, dtype=mx.uint64)
        for name, p in tree_flatten(self.model.trainable_parameters()):
            if f"m.{name}" in state:
                s = _node(self.opt.state, name)
                s["m"] = mx.array(state[f"m.{name}"]).astype(p.dtype)
                s["v"] = mx.array(state[f"v.{name}"]).astype(p.dtype)
        names = [name for name, _ in tree_flatten(self.model.trainable_parameters())]
        if self.tc.ema and all(f"ema.{n}" in state and f"raw.{n}" in state for n in names):
            # Built in the parameters' own order: the compiled step flattens this tree as it did when traced.
            self.model.update(tree_unflatten([(n, mx.array(state[f"raw.{n}"])) for n in names]))
            self._ema["params"] = tree_unflatten([(n, mx.array(state[f"ema.{n}"], dtype=mx.float32)) for n in names])
        if "rng.mlx" in state:
            hi, lo = (int(x) for x in np.asarray(state["rng.mlx"], dtype=np.uint32))
            mx.random.seed((hi << 32) | lo)  # key(seed) is exactly [seed >> 32, seed & 0xffffffff]
