"""The sub-commands. Each imports its framework only when it runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from convert import checkpoint
from convert.config import ModelConfig
from convert.errors import UserError
from convert.training import TrainConfig

from .backends import Backend, default_framework

TRAIN_DEFAULTS = {  # per preset: what `train` uses when a flag is not given
    "tiny": dict(epochs=1, batch_size=32, lr=3e-3, train_samples=2000, warmup=50),
    "small": dict(epochs=10, batch_size=128, lr=1e-3, train_samples=100_000, warmup=500),
    "seed": dict(epochs=10, batch_size=32, lr=5e-4, train_samples=50_000, warmup=500),
}


def _config(args) -> tuple[ModelConfig, str | None]:
    if args.config is not None:
        if args.preset:
            raise UserError("give --preset or --config, not both")
        try:
            text = Path(args.config).read_text()
            data = json.loads(text) if text.strip() else {}
        except OSError as e:
            raise UserError(f"cannot read --config {args.config}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--config {args.config} is not valid JSON ({e}); give a model config JSON file "
                            "(see a checkpoint's config.json)") from None
        cfg = ModelConfig.from_dict(data.get("model", data) if isinstance(data, dict) else data)
        preset = None
    else:
        preset = args.preset or "small"
        cfg = ModelConfig.preset(preset)
    if getattr(args, "attention", None):
        cfg = cfg.replace(attention=args.attention)
    return cfg, preset


def cmd_train(args):
    from .train_loop import RunSpec, read_state, train
    from .distributed import launcher_world

    backend = Backend(args.framework or default_framework(("torch", "mlx")), args.device)
    if args.resume is not None and args.init is not None:
        raise UserError("give --resume (continue a run) or --init (fine-tune from weights), not both")
    if args.resume is not None:
        state, _ = read_state(args.resume)
        saved, meta = checkpoint.read_config(args.resume)
        cfg, preset = (saved, meta.get("preset")) if not (args.preset or args.config) else _config(args)
        spec0 = state["spec"]
        given = {"epochs": args.epochs, "batch_size": args.batch_size, "train_samples": args.train_samples,
                 "seed": args.seed, "augment": args.augment}
        spec_d = {k: (given[k] if given[k] is not None else spec0[k]) for k in given}
        tc = dict(spec0["train"])
        for flag, key in (("lr", "lr"), ("warmup", "warmup_steps"), ("weight_decay", "weight_decay"),
                          ("label_smoothing", "label_smoothing")):
            if getattr(args, flag) is not None:
                tc[key] = getattr(args, flag)
        spec = RunSpec(**spec_d, train=TrainConfig(**tc))
        out = args.out or args.resume
    else:
        cfg, preset = _config(args)
        d = TRAIN_DEFAULTS.get(preset or "small")
        pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
        epochs, bs, n = pick("epochs"), pick("batch_size"), pick("train_samples")
        if n < bs:
            raise UserError(f"--train-samples {n} is less than one batch of {bs}: raise it or lower --batch-size")
        tc = TrainConfig(lr=pick("lr"), warmup_steps=pick("warmup"), total_steps=epochs * (n // bs),
                         weight_decay=args.weight_decay if args.weight_decay is not None else 0.01,
                         label_smoothing=args.label_smoothing or 0.0)
        spec = RunSpec(epochs=epochs, batch_size=bs, train_samples=n, seed=args.seed or 0,
                       augment=args.augment or False, train=tc)
        out = args.out or Path("runs") / (preset or "custom")
    rank, world = launcher_world(backend)
    if spec.batch_size % world:
        raise UserError(f"--batch-size {spec.batch_size} must be divisible by the {world} processes")
    result = train(backend, cfg, spec, out, preset=preset, data_dir=args.data_dir, resume=args.resume, init=args.init,
                   val_samples=args.val_samples, save_every=args.save_every, max_steps=args.max_steps,
                   bf16=args.bf16, quiet=args.quiet, rank=rank, world=world)
    if rank == 0:
        best = result["best"]
        msg = f"saved {out}" + (f" (best val exact match {best['val_exact_match']:.2%} at step {best['step']})"
                                if best else "")
        print(msg)


def _weights_file(which):
    return checkpoint.BEST if which == "best" else checkpoint.WEIGHTS


def cmd_eval(args):
    from mnist_grid import format_table

    from .evaluation import eval_set, evaluate_model

    backend = Backend(args.framework or default_framework(), args.device)
    model = backend.load(args.checkpoint, weights=_weights_file(args.weights), dtype=args.dtype)
    if args.quantize_cache and model.config.attention != "mla":
        raise UserError("--quantize-cache quantizes MLA's latent cache; this checkpoint uses mha: drop the flag")
    images, tokens = eval_set(args.split, model.config.grid, args.samples, args.data_dir)
    m = evaluate_model(backend, model, images, tokens, args.batch_size, quantize_cache=args.quantize_cache)
    m.update(framework=backend.name, device=str(backend.device), split=args.split, checkpoint=str(args.checkpoint),
             dtype=args.dtype, quantize_cache=args.quantize_cache,
             quantization=checkpoint.read_config(args.checkpoint)[0].quantization)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{args.checkpoint} on {args.samples} {args.split} grids ({backend.name}, {args.dtype}):")
        print(format_table(m))
        print(f"exact match {m['exact_match']:.2%}  digit accuracy {m['digit_accuracy']:.2%}")


def cmd_make_grid(args):
    from mnist_grid import GridStream, decode, save_image

    if args.digits is not None and args.digits > args.grid ** 2:
        raise UserError(f"--digits {args.digits} does not fit a {args.grid}x{args.grid} grid "
                        f"(at most {args.grid ** 2})")
    stream = GridStream(args.split, args.grid, 0, args.data_dir)
    x, tokens = stream.fixed(1, seed=args.seed, k=args.digits)
    save_image(args.out, x[0])
    print(decode(tokens)[0])


def _predict_framework(args):
    return args.framework or default_framework(("mlx", "torch"))


def cmd_predict(args):
    from mnist_grid import decode, read_grid_image, readout_warnings

    from .evaluation import predict_tokens

    config, _ = checkpoint.read_config(args.checkpoint)
    images, notes = zip(*[read_grid_image(p, config.grid, args.grid) for p in args.images])
    backend = Backend(_predict_framework(args), args.device)
    model = backend.load(args.checkpoint)
    digits = decode(predict_tokens(backend, model, np.stack(images)))
    for p, d, w in zip(args.images, digits, notes):
        if w := [*w, *readout_warnings(d, args.grid or config.grid)]:  # one line per image
            print(f"mla-mnist: warning: {str(p)!r}: {'; '.join(w)}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"file": str(p), "digits": d} for p, d in zip(args.images, digits)]))
    else:
        for p, d in zip(args.images, digits):
            print(f"{p}: {d}")


def cmd_show(args):
    from .show import show

    digits = show(args.checkpoint, args.image, args.out, args.device, _predict_framework(args), args.layers)
    print(f"{args.image}: {digits} (attention maps in {args.out})")


def cmd_convert(args):
    from convert.formats import convert

    cfg = None
    if args.config is not None or args.preset:
        cfg, _ = _config(args)
    report = convert(args.src, args.dst, dtype=args.dtype, config=cfg, grid=args.grid,
                     quantize=args.quantize, group_size=args.group_size)
    print(report)


def cmd_bench(args):
    from .bench import run

    run(args)
