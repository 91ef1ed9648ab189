"""The sub-commands. Each imports its framework only when it runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from convert import checkpoint
from convert.config import ModelConfig
from convert.errors import UserError
from convert.files import atomic_write
from convert.presets import DEFAULT_PRESET, PRESETS
from convert.training import TrainConfig

from .backends import DEFAULT_CHECKPOINT, INFERENCE_FIRST, TRAINING_FIRST, default_framework, get_backend


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
            raise UserError(
                f"--config {args.config} is not valid JSON ({e}); give a model config JSON file "
                "(see a checkpoint's config.json)"
            ) from None
        cfg = ModelConfig.from_dict(data.get("model", data) if isinstance(data, dict) else data)
        preset = None
    else:
        preset = args.preset or DEFAULT_PRESET
        cfg = ModelConfig.preset(preset)
    if getattr(args, "attention", None) or getattr(args, "kv_heads", None):
        attention = args.attention or cfg.attention
        cfg = cfg.replace(attention=attention, kv_heads=args.kv_heads)  # --kv-heads off gqa: the config refuses
    return cfg, preset


def cmd_train(args):
    from .distributed import launcher_world
    from .train_loop import RunSpec, read_state, train

    backend = get_backend(args.framework or default_framework(TRAINING_FIRST), args.device)
    if args.resume is not None and args.init is not None:
        raise UserError("give --resume (continue a run) or --init (fine-tune from weights), not both")
    if args.resume is not None:
        state, _ = read_state(args.resume)
        saved, meta = checkpoint.read_config(args.resume)
        cfg, preset = (saved, meta.get("preset")) if not (args.preset or args.config) else _config(args)
        interrupted = state["spec"]
        given = {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "train_samples": args.train_samples,
            "seed": args.seed,
            "augment": args.augment,
            "full_grid_steps": args.full_grids,
        }
        run_fields = {k: (given[k] if given[k] is not None else interrupted[k]) for k in given}
        optimiser = dict(interrupted["train"])
        for flag, key in (
            ("lr", "lr"),
            ("warmup", "warmup_steps"),
            ("weight_decay", "weight_decay"),
            ("label_smoothing", "label_smoothing"),
            ("ema", "ema"),
        ):
            if getattr(args, flag) is not None:
                optimiser[key] = getattr(args, flag)
        spec = RunSpec(**run_fields, train=_train_config(optimiser))
        out = args.out or args.resume
    else:
        cfg, preset = _config(args)
        recipe = PRESETS[preset or DEFAULT_PRESET]  # a custom --config trains with the default preset's recipe
        pick = lambda name: getattr(args, name) if getattr(args, name) is not None else getattr(recipe, name)  # noqa: E731
        epochs, batch, samples = pick("epochs"), pick("batch_size"), pick("train_samples")
        if samples < batch:
            raise UserError(
                f"--train-samples {samples} is less than one batch of {batch}: raise it or lower --batch-size"
            )
        optimiser = _train_config(
            dict(
                lr=pick("lr"),
                warmup_steps=pick("warmup"),
                total_steps=epochs * (samples // batch),
                weight_decay=pick("weight_decay"),
                label_smoothing=pick("label_smoothing"),
                ema=pick("ema"),
            )
        )
        spec = RunSpec(
            epochs=epochs,
            batch_size=batch,
            train_samples=samples,
            seed=args.seed or 0,
            augment=pick("augment") or False,
            train=optimiser,
            full_grid_steps=_full_grid_steps(args, recipe),
        )
        out = args.out or Path("runs") / (preset or "custom")
        if (out / checkpoint.CONFIG).is_file():
            _refuse_overwrite(out, args.force, "train", "--out", f", or --resume {str(out)!r} to continue it")
    rank, world = launcher_world(backend)
    if spec.batch_size % world:
        raise UserError(f"--batch-size {spec.batch_size} must be divisible by the {world} processes")
    result = train(
        backend,
        cfg,
        spec,
        out,
        preset=preset,
        data_dir=args.data_dir,
        resume=args.resume,
        init=args.init,
        val_samples=args.val_samples,
        save_every=args.save_every,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        quiet=args.quiet,
        rank=rank,
        world=world,
    )
    if rank == 0:
        best = result["best"]
        msg = f"saved {out}" + (
            f" (best val exact match {best['val_exact_match']:.2%} at step {best['step']})" if best else ""
        )
        print(msg)


def _full_grid_steps(args, recipe) -> int:
    """The preset's full-grid start is for a run from scratch (it ends the first plateau); a fine-tune from
    trained weights (--init) has no plateau to leave and starts on the test distribution."""
    if args.full_grids is not None:
        return args.full_grids
    return 0 if args.init is not None else recipe.full_grid_steps


def _train_config(fields: dict) -> TrainConfig:
    """TrainConfig with its messages pointed at the flags that set each field."""
    try:
        return TrainConfig(**fields)
    except UserError as e:
        hint = {
            "lr": "--lr",
            "total_steps": "--epochs, --train-samples or --batch-size",
            "label_smoothing": "--label-smoothing",
            "ema": "--ema",
        }.get(getattr(e, "field", None))
        raise UserError(f"{e}" + (f" (set by {hint})" if hint else "")) from None


def _refuse_overwrite(path: Path, force: bool, command: str, what: str, hint: str = ""):
    """Nothing is replaced without being asked: an existing output needs --force."""
    if path.exists() and not force:
        raise UserError(f"{command}: {what} {str(path)!r} already exists; pass --force to replace it{hint}")


def _weights_file(which):
    return checkpoint.BEST if which == "best" else checkpoint.WEIGHTS


def cmd_eval(args):
    from mnist_grid import format_table

    from .evaluation import default_batch, eval_set, evaluate_model, readout_text

    backend = get_backend(args.framework or default_framework(), args.device)
    dtype = backend.reading_dtype if args.dtype == "auto" else args.dtype
    model = backend.load(args.checkpoint, weights=_weights_file(args.weights), dtype=dtype)
    if args.quantize_cache and "absorbed" not in model.decode_modes:
        raise UserError(
            f"--quantize-cache quantizes MLA's latent cache; this checkpoint uses "
            f"{model.config.attention}: drop the flag"
        )
    # uint8 grids: the same pixels as float32 (the model scales them on its device), a quarter of the bytes
    images, tokens = eval_set(args.split, model.config.grid, args.samples, args.data_dir, raw=True)
    batch = args.batch_size or default_batch(backend, model.config, args.samples)
    static = None if args.static == "auto" else args.static
    if static is not None and static not in backend.static_paths:
        raise UserError(
            f"--static {static}: {backend.name} on {backend.device} decodes with {', '.join(backend.static_paths)}"
        )
    if static not in (None, "off") and args.quantize_cache:
        raise UserError(f"--static {static} decodes with a float cache: drop --quantize-cache or use --static off")
    if args.readouts is not None:  # before the run, not after it
        _refuse_overwrite(args.readouts, args.force, "eval", "read-out file", hint=" or choose another --readouts")
    kwargs = dict(quantize_cache=args.quantize_cache, static=static)
    warmup = 0.0
    if not backend.on_cpu:
        # A GPU process pays once for loading its kernels, the math libraries' set-up, growing its memory pool
        # and capturing (or compiling) the decoding step of each batch shape: on the H200 more than reading
        # 10,000 small grids takes. One batch of the reading's own shape pays all of it here, timed apart, so
        # the rate is the reading's: every batch after it has this shape (the last one padded) and pays none of it.
        start = time.perf_counter()
        backend.generate(model, images[: min(len(images), batch)], **kwargs)
        warmup = time.perf_counter() - start
    start = time.perf_counter()
    m, readouts = evaluate_model(backend, model, images, tokens, batch, quiet=args.quiet, **kwargs)
    seconds = time.perf_counter() - start
    if args.readouts is not None:
        text = readout_text(readouts).encode()
        atomic_write(args.readouts, lambda f: f.write(text), binary_file=True)
    m.update(
        seconds=seconds,
        grids_per_s=args.samples / seconds,
        warmup_seconds=warmup,
        batch_size=batch,
        static=args.static,
        framework=backend.name,
        device=str(backend.device),
        split=args.split,
        checkpoint=str(args.checkpoint),
        dtype=dtype,
        quantize_cache=args.quantize_cache,
        quantization=checkpoint.read_config(args.checkpoint)[0].quantization,
    )
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{args.checkpoint} on {args.samples} {args.split} grids ({backend.name}, {dtype}):")
        print(format_table(m))
        print(f"exact match {m['exact_match']:.2%}  digit accuracy {m['digit_accuracy']:.2%}")
        rate = m["grids_per_s"]
        after = f"; after a {warmup:.1f} s warm-up" if warmup else ""
        print(f"read in {seconds:.1f} s ({rate:,.{0 if rate >= 100 else 1}f} grids/s, batch {batch}{after})")


def cmd_make_grid(args):
    from mnist_grid import GridStream, decode, save_image

    if args.digits is not None and args.digits > args.grid**2:
        raise UserError(f"--digits {args.digits} does not fit a {args.grid}x{args.grid} grid (at most {args.grid**2})")
    stream = GridStream(args.split, args.grid, 0, args.data_dir)
    x, tokens = stream.fixed(1, seed=args.seed, k=args.digits)
    save_image(args.out, x[0])
    print(decode(tokens)[0])


def _predict_framework(args):
    return args.framework or default_framework(INFERENCE_FIRST)


def cmd_predict(args):
    from mnist_grid import decode, read_grid_image, readout_warnings

    from .evaluation import predict_tokens, progress_bar

    config, _ = checkpoint.read_config(args.checkpoint)
    quiet = args.quiet or len(args.images) < 16  # a bar only where there is a wait to see
    with progress_bar(len(args.images), "image", quiet, desc="loading") as bar:
        images, notes = zip(*[(read_grid_image(p, config.grid, args.grid), bar.update())[0] for p in args.images])
    backend = get_backend(_predict_framework(args), args.device)
    model = backend.load(args.checkpoint)
    with progress_bar(len(images), "image", quiet, desc="reading") as bar:
        digits = decode(predict_tokens(backend, model, np.stack(images), progress=bar))
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

    if len(args.args) > 2:
        raise UserError(f"show takes [CHECKPOINT] IMAGE, got {len(args.args)} paths")
    ckpt, image = (DEFAULT_CHECKPOINT, *args.args) if len(args.args) == 1 else args.args
    digits = show(checkpoint.by_name(ckpt), Path(image), args.out, args.device, _predict_framework(args), args.layers)
    print(f"{image}: {digits} (attention maps in {args.out})")


def cmd_convert(args):
    from convert.formats import FILE_KINDS, convert

    from .evaluation import progress_bar

    cfg = None
    if args.config is not None or args.preset:
        cfg, _ = _config(args)
    _refuse_overwrite(args.dst, args.force, "convert", "DST")
    if args.dst.suffix and args.dst.suffix.lower() not in FILE_KINDS and not args.dst.is_dir():
        raise UserError(
            f"DST {str(args.dst)!r} ends in {args.dst.suffix!r}, not a weights format this project "
            f"writes ({', '.join(FILE_KINDS)}); give one of those, or a directory name without an "
            "extension for a checkpoint directory"
        )
    with progress_bar(1, "file", args.quiet, desc="converting"):
        report = convert(
            args.src,
            args.dst,
            dtype=args.dtype,
            config=cfg,
            grid=args.grid,
            quantize=args.quantize,
            group_size=args.group_size,
        )
    print(report)


def cmd_bench(args):
    from .bench import run

    out = args.out or Path("runs") / f"bench-{Path(args.checkpoint).name if args.checkpoint else args.preset}"
    args.json = args.json or out / "bench.json"
    args.plot = args.plot or out / "bench.png"
    for path in (args.json, args.plot):  # before the run, not after it
        _refuse_overwrite(path, args.force, "bench", "output")
    run(args)


def cmd_parity(args):
    from convert.checkpoint import FLOAT_DTYPES

    from .backends import FRAMEWORKS
    from .parity import format_report, parse_list, parse_tolerances, plot_drift, run_parity, write_json

    cfg = None
    if args.config is not None or args.preset:
        cfg, _ = _config(args)
    report = run_parity(
        args.reference,
        args.candidate,
        frameworks=parse_list(args.frameworks, FRAMEWORKS, "--frameworks", ()) or None,
        dtypes=parse_list(args.dtype, FLOAT_DTYPES, "--dtype", ()),
        samples=args.samples,
        modes=parse_list(args.modes, ("absorbed", "expanded", "uncached"), "--modes", ()) or None,
        tolerances=parse_tolerances(args.tolerance),
        device=args.device,
        config=cfg,
        grid=args.grid,
        data_dir=args.data_dir,
    )
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_drift(report, args.plot)
    return 0 if report["passed"] else 1


def cmd_info(args):
    from .info import format_info, info

    d = info(args.checkpoint)
    print(json.dumps(d) if args.json else format_info(d))
