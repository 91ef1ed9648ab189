"""The training loop both frameworks share: data stream, schedule, progress, validation, checkpoints, resume."""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convert import checkpoint, safetensors_np
from convert.config import ModelConfig
from convert.errors import UserError
from convert.schema import parameter_count, schema
from convert.training import STATE_PREFIXES, TrainConfig, check_optimizer_state, check_run_state
from mnist_grid import GridStream, decode
from mnist_grid.grid import tokens
from mnist_grid.metrics import counts, digit_accuracy
from mnist_grid.tokens import PAD

from .evaluation import EVAL_SEED, predict_tokens

STATE = "train_state.json"
OPTIMIZER = "optimizer.safetensors"


@dataclass
class RunSpec:
    """Everything that fixes a run's data order and schedule: resume refuses to change it."""

    epochs: int
    batch_size: int
    train_samples: int
    seed: int
    augment: bool | str  # False, "shift" or "affine" (mnist_grid.GridStream)
    train: TrainConfig
    full_grid_steps: int = 0  # steps [0, full_grid_steps) draw grids with every cell occupied

    @property
    def steps_per_epoch(self):
        return self.train_samples // self.batch_size

    def to_dict(self):
        d = {k: getattr(self, k) for k in RUN_FIELDS}
        return {**d, "train": self.train.to_dict()}


RUN_FIELDS = ("epochs", "batch_size", "train_samples", "seed", "augment", "full_grid_steps")
# Run settings added since a run may have been saved: absent from its spec, they take these defaults (how it ran).
RUN_DEFAULTS = {f.name: f.default for f in fields(RunSpec) if f.default is not MISSING}


def batch_source(stream: GridStream, steps, steps_per_epoch, batch_size, rank, world, renderer=None, full_steps=0):
    """Batches for `steps` in order; steps before `full_steps` have every cell occupied. With a renderer (the
    model is on an accelerator) only the cheap random draw happens on the host: the grids are composed on the
    device, from digits uploaded once."""
    cells = stream.grid * stream.grid
    for step in steps:
        epoch, index = divmod(step, steps_per_epoch)
        k = cells if step < full_steps else None
        if renderer is None:
            yield stream.batch(epoch, index, batch_size, rank, world, k=k)
        else:
            d, rows = stream.batch_draw(epoch, index, batch_size, rank, world, k=k)
            yield renderer.render(d, rows), tokens(stream.labels, stream.grid, d, rows)


def read_state(path) -> tuple[dict, dict[str, np.ndarray]]:
    path = checkpoint.resolve(path)
    if not (path / STATE).is_file() or not (path / OPTIMIZER).is_file():
        raise UserError(
            f"{path} has no training state ({STATE}, {OPTIMIZER}): it can be evaluated, not resumed; "
            "resume from the --out directory of a training run"
        )
    try:
        state = checkpoint.read_json(path / STATE, "the training state")
    except UserError:
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("spec"), dict):
        raise UserError(
            f"{path / STATE} is corrupt (not the JSON a training run writes); "
            "resume from an intact checkpoint or start a new run"
        )
    check_run_state(state, path / STATE)
    state["spec"] = {**RUN_DEFAULTS, **state["spec"]}
    arrays, _, _ = safetensors_np.read(path / OPTIMIZER)
    check_optimizer_state(arrays, path / OPTIMIZER)
    config, _ = checkpoint.read_config(path)
    shapes = _optimizer_shapes(config)
    bad = [k for k, v in arrays.items() if k in shapes and v.shape != shapes[k]]
    if "step" not in arrays or bad or not all(k in shapes or k.startswith("rng.") for k in arrays):
        raise UserError(
            f"{path / OPTIMIZER} does not match the checkpoint's model "
            f"({'no step' if 'step' not in arrays else ', '.join(bad[:3]) or 'unknown tensors'}); "
            "resume from an intact checkpoint or start a new run"
        )
    return state, arrays


def _optimizer_shapes(config):
    shapes = {"step": ()}
    for name, shape in schema(config).items():
        for prefix in STATE_PREFIXES:
            shapes[f"{prefix}{name}"] = tuple(shape)
    return shapes


class Progress:
    """tqdm bar with loss, lr, samples/s; reads the loss back only every few steps to avoid host syncs."""

    def __init__(self, total, initial, batch_size, quiet):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=quiet, mininterval=0.5)
        self.batch_size, self.t0, self.n0 = batch_size, time.perf_counter(), initial

    def update(self, step, loss, lr, every=10):
        self.bar.update(1)
        if step % every == 0 or step == self.bar.total:
            rate = (step - self.n0) * self.batch_size / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")

    def close(self):
        self.bar.close()


def _holding_out_lock(fn):
    """Rank 0 holds `out`'s run lock for the whole run: a second training into it refuses at once."""

    @functools.wraps(fn)
    def locked(backend, config, spec, out, *args, rank=0, **kwargs):
        if rank != 0:
            return fn(backend, config, spec, out, *args, rank=rank, **kwargs)
        checkpoint.check_writable(out)  # its messages are the precise ones for a bad --out
        with checkpoint.run_lock(out):
            return fn(backend, config, spec, out, *args, rank=rank, **kwargs)

    return locked


@_holding_out_lock
def train(
    backend,
    config: ModelConfig,
    spec: RunSpec,
    out: Path,
    *,
    preset=None,
    data_dir=None,
    resume=None,
    init=None,
    val_samples=512,
    save_every=0,
    max_steps=0,
    max_minutes=0.0,
    bf16=False,
    quiet=False,
    rank=0,
    world=1,
    log=print,
) -> dict:
    """Train, validating and checkpointing to `out` after every epoch; returns the final metrics."""
    out = Path(out)
    if rank == 0:
        checkpoint.check_writable(out)  # now, not after the first epoch
    stream = GridStream("train", config.grid, spec.seed, data_dir, augment=spec.augment)
    val_x, val_y = GridStream("val", config.grid, 0, data_dir).fixed(val_samples, seed=EVAL_SEED)
    model = backend.build(config, seed=spec.seed)
    trainer = backend.trainer(model, spec.train, bf16=bf16, world=world)
    history, best = [], None
    if init is not None:  # fine-tune: start from a checkpoint's weights with a fresh optimiser and schedule
        init_cfg, weights, _ = checkpoint.load(init)
        if init_cfg.replace(dropout=config.dropout) != config:
            raise UserError(f"--init {init}: its model config differs from the one asked for; use the same --preset")
        backend.load_weights(model, weights)
    if resume is not None:
        state, arrays = read_state(resume)
        saved_cfg, _ = checkpoint.read_config(resume)
        if saved_cfg != config:
            raise UserError(
                f"--resume {resume}: the checkpoint's model config differs from the one asked for; "
                "drop --preset/--config to continue with the checkpoint's own"
            )
        asked = json.loads(json.dumps(spec.to_dict()))  # as stored: tuples become lists
        # Settings added since the run was saved take their defaults, which is how it ran.
        saved = {**state["spec"], "train": json.loads(json.dumps(TrainConfig(**state["spec"]["train"]).to_dict()))}
        if saved != asked:
            diff = [k for k in {**saved, **asked} if saved.get(k) != asked.get(k)]
            raise UserError(
                f"--resume {resume}: {', '.join(diff)} differ from the interrupted run's; resume "
                "continues the same run, so leave them as they were"
            )
        _, weights, _ = checkpoint.load(resume)
        backend.load_weights(model, weights)
        trainer.load_state(arrays)
        history, best = state.get("history", []), state.get("best")
    start = trainer.step_count
    if world > 1:
        # Every rank built the same initial weights from one seed; its dropout masks must not be the other ranks'
        # too. Drawn from (seed, step, rank), so a resumed run draws as a fresh one from that step would.
        backend.seed(int(np.random.default_rng([spec.seed, start, rank]).integers(2**31)))
    total = spec.epochs * spec.steps_per_epoch
    stop_at = min(total, max_steps) if max_steps else total
    if rank == 0:
        log(
            f"training {config.attention} model ({parameter_count(config) / 1e6:.2f}M params) "
            f"on {backend.name}:{backend.device}, {spec.epochs} epoch(s) x {spec.steps_per_epoch} steps of "
            f"{spec.batch_size} grids, from step {start}"
        )
    progress = Progress(stop_at, start, spec.batch_size, quiet or rank != 0)
    t_epoch, losses = time.perf_counter(), []
    step = start
    renderer = None if backend.on_cpu else backend.grid_renderer(stream.images)
    batches = batch_source(
        stream,
        range(start, stop_at),
        spec.steps_per_epoch,
        spec.batch_size,
        rank,
        world,
        renderer,
        full_steps=spec.full_grid_steps,
    )
    deadline = time.perf_counter() + max_minutes * 60 if max_minutes else None
    for step in range(start, stop_at):
        epoch, index = divmod(step, spec.steps_per_epoch)
        x, y = next(batches)
        loss, _ = trainer.step(x, y)
        losses.append(loss)
        progress.update(step + 1, loss, spec.train.lr_at(step))
        end_of_epoch = (step + 1) % spec.steps_per_epoch == 0
        last = step + 1 == stop_at or _out_of_time(backend, deadline, step, world)
        if end_of_epoch or (save_every and (step + 1) % save_every == 0) or last:
            record = None
            if end_of_epoch or last:
                train_loss = float(np.mean([float(v) for v in losses])) if losses else float("nan")
                if not math.isfinite(train_loss):
                    kept = (
                        f"the last checkpoint saved in {out} is kept"
                        if (out / checkpoint.CONFIG).is_file()
                        else "no checkpoint was saved"
                    )
                    raise UserError(f"training diverged at step {step + 1} (loss {train_loss}); {kept}: lower --lr")
                record = _validate(
                    backend,
                    model,
                    trainer,
                    val_x,
                    val_y,
                    epoch + (index + 1) / spec.steps_per_epoch,
                    step + 1,
                    train_loss,
                    spec,
                    time.perf_counter() - t_epoch,
                    len(losses),
                    rank,
                    world,
                )
                history.append(record)
                losses, t_epoch = [], time.perf_counter()
                if rank == 0:
                    progress.bar.write(_line(record))
            if rank == 0:
                improved = record is not None and (best is None or record["val_exact_match"] >= best["val_exact_match"])
                if improved:
                    best = record
                _save(backend, model, trainer, out, config, preset, spec, history, best, improved)
        if last:
            break
    progress.close()
    return {"history": history, "best": best, "step": step + 1 if stop_at > start else start}


def _out_of_time(backend, deadline, step, world, every=20) -> bool:
    """--max-minutes: looked at every `every` steps; the ranks of a data-parallel run stop at the same step
    (any rank's clock past the deadline stops them all)."""
    if deadline is None or (step + 1) % every:
        return False
    late = float(time.perf_counter() > deadline)
    return (backend.all_sum(np.array([late]))[0] if world > 1 else late) > 0


def _validation_sums(backend, model, trainer, x, y) -> np.ndarray:
    """[loss sum, targets, exact matches, digit edits, target digits, grids] over these grids."""
    sums = np.zeros(6)
    for i in range(0, len(x), 256):
        targets = int((y[i : i + 256, 1:] != PAD).sum())
        sums[:2] += trainer.eval_loss(x[i : i + 256], y[i : i + 256]) * targets, targets
    if len(x):
        sums[2:] = counts(zip(decode(predict_tokens(backend, model, x)), decode(y)))
    return sums


def _validate(backend, model, trainer, val_x, val_y, epoch, step, train_loss, spec, seconds, steps, rank=0, world=1):
    # Each rank scores its own slice of the validation grids; the sums over ranks score the whole set.
    rows = slice(rank * len(val_x) // world, (rank + 1) * len(val_x) // world)
    with trainer.averaged():
        sums = _validation_sums(backend, model, trainer, val_x[rows], val_y[rows])
    loss_sum, targets, exact, edits, digits, grids = backend.all_sum(sums).tolist()
    return {
        "epoch": round(epoch, 4),
        "step": step,
        "lr": spec.train.lr_at(step - 1),
        "train_loss": train_loss,
        "val_loss": loss_sum / targets,
        "val_exact_match": exact / grids,
        "val_digit_accuracy": digit_accuracy(edits, digits),
        "samples_per_s": steps * spec.batch_size / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _line(r):
    return (
        f"epoch {r['epoch']:.2f} step {r['step']}: train loss {r['train_loss']:.4f}  val loss "
        f"{r['val_loss']:.4f}  val exact {r['val_exact_match']:.2%}  val digits {r['val_digit_accuracy']:.2%}  "
        f"{r['samples_per_s']:.0f} samples/s"
    )


def _save(backend, model, trainer, out, config, preset, spec, history, best, improved):
    # What eval and predict load is the weights validation scored; the optimizer state keeps the raw ones.
    with trainer.averaged():  # copied: torch's arrays share the parameters' memory on a CPU
        weights = {k: np.array(v, copy=True) for k, v in backend.weights(model).items()}
    optimizer = trainer.state()
    state = {
        "step": trainer.step_count,
        "framework": backend.name,
        "spec": spec.to_dict(),
        "history": history,
        "best": best,
    }
    files = {STATE: json.dumps(state, indent=2).encode(), OPTIMIZER: lambda p: safetensors_np.write(p, optimizer)}
    if improved:
        files[checkpoint.BEST] = lambda p: safetensors_np.write(p, weights)
    metrics = {"history": history, "best": best, "framework": backend.name}
    checkpoint.save(out, config, weights, preset=preset, metrics=metrics, files=files, keep=(checkpoint.BEST,))
