"""What `mla-mnist bench` measures. Every generation is forced to its full length (stop=False), so each row does
the same work; each number is the median of --repeats timed runs, after one warm-up run per framework, attention
and mode, the runs taking turns so that a slow spell of a shared machine falls on all of them alike. The
machine's own fp32 matmul rate is sampled through the run, so the encoder's FLOP/s reads as a share of it."""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convert import checkpoint, formats, safetensors_np
from convert.config import ModelConfig
from convert.errors import UserError
from convert.flops import encoder_flops
from convert.schema import ATTENTION
from convert.training import TrainConfig
from mnist_grid.tokens import FINISH, PAD, START

from ..backends import FRAMEWORKS, get_backend, installed
from ..evaluation import progress_bar
from . import decoding, report
from .timing import load_average, machine, peak_memory, timed

COLUMNS = ("samples_per_s", "tokens_per_s", "encoder_ms", "decode_ms_per_token", "cache_bytes", "peak_memory_bytes")


def generation_rows(players, length, repeats, warm_up):
    """Every player (backend, model, images, mode) at one length, the repeats interleaved (A B C, A B C, ...).
    Per player: median seconds of a forced-length generation (the encoder included) and of its encoder, the median
    of their difference, the cache it held, and the peak memory of its last run."""

    def once(backend, model, images, mode):
        enc, enc_seconds = timed(backend, lambda: backend.encode(model, images))
        (_, cache), decode_seconds = timed(
            backend,
            lambda: backend.generate(
                model, None, encoded=enc, max_length=length, mode=mode, stop=False, return_cache=True
            ),
        )
        return cache, enc_seconds + decode_seconds, enc_seconds

    runs, memory = [[] for _ in players], [None] * len(players)
    for player in players if warm_up else ():
        once(*player)
    for _ in range(repeats - 1):
        for i, player in enumerate(players):
            runs[i].append(once(*player))
    for i, player in enumerate(players):  # the last round also reads the peak memory
        run, memory[i] = peak_memory(player[0], lambda player=player: once(*player))
        runs[i].append(run)
    out = []
    for timed_runs, mem in zip(runs, memory):
        totals, encs = [t for _, t, _ in timed_runs], [e for _, _, e in timed_runs]
        out.append(
            (
                statistics.median(totals),
                statistics.median(encs),
                statistics.median(t - e for t, e in zip(totals, encs)),
                timed_runs[-1][0],
                mem,
            )
        )
    return out


def cross_attention_us(backend, model, batch, calls=200):
    """One decoding step of the first decoder layer's cross-attention, in microseconds (median of `calls`):
    attending in latent space (absorbed) against K/V expanded once per image."""
    cfg, rng, dtype = model.config, np.random.default_rng(0), backend.dtype_of(model)
    enc = backend.array(rng.standard_normal((batch, cfg.enc_tokens, cfg.d_model), dtype=np.float32), dtype)
    x = backend.array(rng.standard_normal((batch, 1, cfg.d_model), dtype=np.float32), dtype)
    layer, out = model.decoder[0].cross_attn, {}
    with backend.no_grad():
        for name, absorbed in (("latent", True), ("expanded", False)):
            memory = layer.memory(enc, absorbed)
            times = []
            for i in range(calls + 10):  # ten warm-up calls
                _, seconds = timed(backend, lambda memory=memory: layer(x, memory))
                if i >= 10:
                    times.append(seconds)
            out[name] = 1e6 * statistics.median(times)
    return out


# ---- weight and cache variants (quantization) -----------------------------------------------------------
WEIGHT_VARIANTS = (
    ("float32", None, None),
    ("float16", None, None),
    ("8-bit, groups of 64", 8, 64),
    ("4-bit, groups of 32", 4, 32),
)


def weight_variants(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> list[dict]:
    """File size and stored weight bytes of the model saved as each variant (quantized ones need MLX; scales
    and unquantized tensors in float16, as `convert --quantize` writes them)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits, group in WEIGHT_VARIANTS:
            out, dtype, variant_cfg = weights, ("float16" if name != "float32" else "float32"), cfg
            if bits is not None:
                try:
                    out, _ = formats.quantize_weights(weights, dtype, bits, group)
                except UserError as e:  # no MLX: the float rows still stand
                    rows.append({"variant": name, "skipped": str(e)})
                    continue
                variant_cfg = cfg.replace(quantization={"bits": bits, "group_size": group})
            path = checkpoint.save(Path(tmp) / name.split(",")[0], variant_cfg, out, dtype=dtype)
            stored, _, _ = safetensors_np.read(path / checkpoint.WEIGHTS, upcast_bf16=False)
            rows.append(
                {
                    "variant": name,
                    "file_bytes": (path / checkpoint.WEIGHTS).stat().st_size,
                    "weight_bytes": sum(a.nbytes for a in stored.values()),
                }
            )
    return rows


def cache_variants(backend, cfg: ModelConfig, batch: int, length: int) -> list[dict]:
    """Bytes of the decoder self-attention cache for `length` positions, read from real cache objects: each
    variant's cache in float32, MLA's latent in float16 too, and the int8 latent (per-token scale, k_pe in the
    model dtype)."""
    kinds = [(f"{a.upper()} {'latent' if a == 'mla' else 'K/V'}, float32", a, "float32", False) for a in ATTENTION]
    kinds += [
        ("MLA latent, float16", "mla", "float16", False),
        ("MLA int8 latent, float32 model", "mla", "float32", True),
        ("MLA int8 latent, float16 model", "mla", "float16", True),
    ]
    rows = []
    for name, attention, dtype, quantized in kinds:
        model = backend.cast(backend.build(cfg.replace(attention=attention, kv_heads=None), seed=0), dtype)
        cache = model.new_cache(batch, length, [], quantized=quantized)
        rows.append(
            {
                "cache": name,
                "attention": attention,
                "bytes": cache.self_nbytes,
                "bytes_per_position_per_layer": cache.self_nbytes // (batch * length * cfg.dec_layers),
            }
        )
    return rows


def synthetic_batch(cfg, batch, seed=0):
    """Random images and full-length token rows (<start> grid^2 digits <finish>): throughput only."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch, cfg.image_size, cfg.image_size), dtype=np.float32)
    tokens = np.full((batch, cfg.max_tokens), PAD, dtype=np.int64)
    tokens[:, 0], tokens[:, -1] = START, FINISH
    tokens[:, 1:-1] = rng.integers(0, 10, (batch, cfg.max_tokens - 2))
    return images, tokens


def training_samples_per_s(backends, cfg, batch, steps, rounds=3, bf16=False):
    """Samples/s of each framework's training step. The frameworks take turns, `rounds` rounds of
    steps // rounds steps each, and each keeps its median round: side by side, like the generation rows."""
    rounds = min(rounds, steps)
    per_round = steps // rounds
    host_images, host_tokens = synthetic_batch(cfg, batch)
    trainers, batches = [], []
    for backend in backends:
        trainer = backend.trainer(
            backend.build(cfg, seed=0), TrainConfig(lr=1e-4, warmup_steps=0, total_steps=steps + 2), bf16=bf16
        )
        # On the device already, as training's grids are (composed there): the step is timed, not an upload.
        images, tokens = backend.array(host_images), backend.array(host_tokens)
        for _ in range(2):  # warm-up (MLX compiles its step on the first call)
            float(trainer.step(images, tokens)[0])
        trainers.append(trainer)
        batches.append((images, tokens))
    rates, memory = [[] for _ in backends], []
    for backend, trainer, data in zip(backends, trainers, batches):  # one more step each, for its peak memory
        memory.append(peak_memory(backend, lambda trainer=trainer, data=data: float(trainer.step(*data)[0]))[1])
    for _ in range(rounds):
        for trainer, rate, (images, tokens) in zip(trainers, rates, batches):
            start = time.perf_counter()
            for _ in range(per_round):
                loss, _ = trainer.step(images, tokens)
            float(loss)  # waits for the last step
            rate.append(per_round * batch / (time.perf_counter() - start))
    return [(statistics.median(rate), mem) for rate, mem in zip(rates, memory)]


def render_grids_per_s(backends, cfg, batch: int, data_dir=None, rounds: int = 3) -> list[dict]:
    """Training grids composed per second, affine-augmented, numpy on the host against each framework's renderer
    on its device: the frameworks take turns, `rounds` rounds, each keeps its median."""
    from mnist_grid import GridStream, render

    stream = GridStream("train", cfg.grid, 0, data_dir, augment="affine")
    draws = [stream.draw(np.random.default_rng(i), batch, augment="affine") for i in range(3)]
    makers = [("numpy (host)", None, lambda d: render(stream.images, stream.labels, stream.grid, d)[0])]
    for backend in backends:
        renderer = backend.grid_renderer(stream.images)
        makers.append((f"{backend.name} ({backend.device})", backend, renderer.render))
    rates = {name: [] for name, _, _ in makers}
    for _, backend, make in makers:  # warm-up: kernels, allocations
        out = make(draws[0])
        if backend is not None:
            backend.synchronize(out)
    for _ in range(rounds):
        for name, backend, make in makers:
            start = time.perf_counter()
            for d in draws:
                out = make(d)
                if backend is not None:
                    backend.synchronize(out)
            rates[name].append(len(draws) * batch / (time.perf_counter() - start))
    return [
        {"renderer": name, "batch": batch, "augment": "affine", "grids_per_s": statistics.median(r)}
        for name, r in rates.items()
    ]


def _model(backend, cfg, attention, ckpt, dtype):
    """The checkpoint's weights for its own attention variant, random weights for the others; in `dtype`."""
    if ckpt is not None and cfg.attention == attention:
        return backend.load(ckpt, dtype=dtype), "checkpoint"
    return backend.cast(backend.build(cfg.replace(attention=attention, kv_heads=None), seed=0), dtype), "random"


def parse_list(text, flag, parse, allowed=None):
    try:
        items = [parse(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        items = []
    if not items or (allowed and set(items) - set(allowed)):
        raise UserError(
            f"{flag} {text!r}: give a comma-separated list"
            + (f" of {', '.join(allowed)}" if allowed else " of integers >= 2")
        )
    return items


class Progress:
    """A bar over the generation rows on stderr (stdout stays the report); notes beside it. Quiet with --quiet
    or when stderr is not a terminal."""

    def __init__(self, rows: int, quiet: bool):
        self.bar = progress_bar(rows, "row", quiet, desc="bench")

    def row(self, line: str):
        self.bar.set_postfix_str(line, refresh=False)
        self.bar.update()

    def note(self, line: str):
        if not self.bar.disable:
            self.bar.write(line, file=sys.stderr)

    def close(self):
        self.bar.close()


def speedups(rows):
    """Each variant's best cached mode (absorbed for MLA) over uncached samples/s, per framework and length."""
    by = {(r["framework"], r["attention"], r["length"], r["mode"]): r["samples_per_s"] for r in rows}
    best = {}
    for framework, attention, length, mode in by:
        if mode != "uncached":
            best.setdefault((framework, attention, length), mode)  # rows come in each model's decode_modes order
    return [
        {
            "framework": fw,
            "attention": a,
            "length": n,
            "mode": mode,
            "cached_over_uncached": by[(fw, a, n, mode)] / by[(fw, a, n, "uncached")],
        }
        for (fw, a, n), mode in best.items()
    ]


def _backends(args):
    backends, problems = [], []
    for framework in dict.fromkeys(parse_list(args.frameworks, "--frameworks", str, FRAMEWORKS)):
        try:
            if not installed(framework):
                raise UserError(f"{framework} is not installed")
            backends.append(get_backend(framework, args.device, args.threads))
        except UserError as e:  # the other framework may still run
            problems.append(f"no {framework} rows: {e}")
    if not backends:
        raise UserError("; ".join(problems))
    for line in problems:
        print(f"({line})")
    return backends


def run(args):
    lengths = parse_list(args.lengths, "--lengths", int)
    if min(lengths) < 2:
        raise UserError(f"--lengths {args.lengths!r}: every length must be >= 2 (<start> plus one token)")
    decode_batches = parse_list(args.decode_batches, "--decode-batches", int) if args.decode_batches else []
    if decode_batches and args.decode_length < 2:
        raise UserError(f"--decode-length {args.decode_length}: at least 2 (<start> plus one token)")
    if decode_batches and min(decode_batches) < 1:
        raise UserError(f"--decode-batches {args.decode_batches!r}: every batch must be >= 1")
    paths = None
    if getattr(args, "decode_paths", None):
        paths = parse_list(args.decode_paths, "--decode-paths", str, ("off", "eager", "graph", "compiled", "fused"))
    backends = _backends(args)
    for backend in backends if paths and decode_batches else ():  # asked for and not there: said, not skipped quietly
        missing = [p for p in paths if p not in backend.static_paths]
        if missing:
            have = ", ".join(backend.static_paths)
            print(f"(no {', '.join(missing)} rows: {backend.name} on {backend.device} decodes with {have})")
    if args.checkpoint is not None:
        cfg, _ = checkpoint.read_config(args.checkpoint)
        source = str(args.checkpoint)
    else:
        cfg, source = ModelConfig.preset(args.preset), f"random weights of preset {args.preset}"
    batch = args.batch_size
    images = np.random.default_rng(0).random((batch, cfg.image_size, cfg.image_size), dtype=np.float32)
    result = {
        "machine": machine(),
        "model": source,
        "config": cfg.to_dict(),
        "batch_size": batch,
        "dtype": args.dtype,
        "lengths": lengths,
        "repeats": args.repeats,
        "frameworks": {},
        "rows": [],
    }
    # The matmul rate of each framework is sampled before and between the lengths and its median kept: the
    # encoder's share of it then compares two medians over the same stretch of time.
    matmul, enc_ms = {}, {}
    # Every variant's models up front: the bar's total is their decoding modes, read from the models themselves.
    attentions = parse_list(getattr(args, "attentions", ",".join(ATTENTION)), "--attentions", str, ATTENTION)
    built_by = {
        a: [(backend, *_model(backend, cfg, a, args.checkpoint, args.dtype)) for backend in backends]
        for a in dict.fromkeys(attentions)
    }
    rows_total = sum(len(model.decode_modes) for built in built_by.values() for _, model, _ in built) * len(lengths)
    progress = Progress(rows_total, getattr(args, "quiet", False))
    for backend in backends:
        info = result["frameworks"][backend.name] = {**backend.device_info(), "encoder": {}}
        matmul[backend.name] = [backend.matmul_gflops(max(args.repeats, 3))]
        progress.note(f"{backend.name} on {info['device']}: fp32 matmul {matmul[backend.name][0]:.1f} GFLOP/s")
    for attention, built in built_by.items():
        players = [
            (backend, model, backend.array(images), mode) for backend, model, _ in built for mode in model.decode_modes
        ]
        weights_of = {backend.name: weights for backend, _, weights in built}
        for length in lengths:  # one warm-up per player (at the first length) readies every kernel
            rows = generation_rows(players, length, args.repeats, warm_up=length == lengths[0])
            for (backend, _, _, mode), (total, enc, decode, cache, memory) in zip(players, rows):
                name = backend.name
                enc_ms.setdefault((name, attention), []).append(1e3 * enc)
                result["rows"].append(
                    {
                        "framework": name,
                        "mode": mode,
                        "attention": attention,
                        "weights": weights_of[name],
                        "length": length,
                        "samples_per_s": batch / total,
                        "tokens_per_s": batch * (length - 1) / total,
                        "encoder_ms": 1e3 * enc,
                        "decode_ms_per_token": 1e3 * decode / (length - 1),
                        "cache_bytes": cache.nbytes if cache is not None else None,
                        "self_cache_bytes": cache.self_nbytes if cache is not None else None,
                        "cross_cache_bytes": cache.cross_nbytes if cache is not None else None,
                        **memory,
                    }
                )
                progress.row(f"{name} {mode} {attention} length {length}: {batch / total:.2f} samples/s")
            for backend in backends:
                matmul[backend.name].append(backend.matmul_gflops(3))
        flops = encoder_flops(cfg.replace(attention=attention, kv_heads=None)) * batch
        for backend, model, _ in built:
            info, ms = result["frameworks"][backend.name], statistics.median(enc_ms[(backend.name, attention)])
            if "absorbed" in model.decode_modes:
                info["cross_attention_us"] = cross_attention_us(backend, model, batch)
            info["encoder"][attention] = {
                "gflop_per_batch": flops / 1e9,
                "median_ms": ms,
                "gflops": flops / (ms / 1e3) / 1e9,
            }
    for backend in backends:
        info = result["frameworks"][backend.name]
        info["matmul_gflops"], info["matmul_gflops_samples"] = (
            statistics.median(matmul[backend.name]),
            matmul[backend.name],
        )
        for e in info["encoder"].values():
            e["fraction_of_matmul"] = e["gflops"] / info["matmul_gflops"]
    if decode_batches or args.eval_samples or args.checkpoint is not None:

        @functools.cache
        def models_of(attention):  # the generation rows' models where they were built, else built once now
            built = built_by.get(attention) or [
                (b, *_model(b, cfg, attention, args.checkpoint, args.dtype)) for b in backends
            ]
            return [model for _, model, _ in built]

        if decode_batches:  # the fixed-shape step is MLA's: random MLA weights for another checkpoint
            models = models_of("mla")
            length = min(args.decode_length, cfg.max_tokens)
            result["decode_paths"] = decoding.path_rows(
                backends, models, cfg, decode_batches, length, args.repeats, args.dtype, progress=progress, paths=paths
            )
        # Reading and scoring use the model's own weights and attention (random weights without a checkpoint).
        if args.checkpoint is not None:  # a trained model: what reading real grids costs, early stop included
            result["real"] = decoding.real_rows(
                backends, models_of(cfg.attention), cfg, batch, args.repeats, progress=progress, paths=paths
            )
        if args.eval_samples:
            result["eval"] = decoding.eval_rows(
                backends, models_of(cfg.attention), cfg, args.eval_samples, None, progress=progress, paths=paths
            )
    if args.train_steps:
        train_batch = args.train_batch_size or batch
        bf16 = args.train_dtype == "bfloat16"
        for backend, (rate, memory) in zip(
            backends, training_samples_per_s(backends, cfg, train_batch, args.train_steps, bf16=bf16)
        ):
            info = result["frameworks"][backend.name]
            info["train_samples_per_s"], info["train_steps"], info["train_batch_size"] = (
                rate,
                args.train_steps,
                train_batch,
            )
            info["train_dtype"], info["train_peak_memory_bytes"] = args.train_dtype, memory["peak_memory_bytes"]
            progress.note(f"{backend.name} training: {rate:.2f} samples/s")
    if args.render_batch:
        result["render"] = render_grids_per_s(backends, cfg, args.render_batch)
        for row in result["render"]:
            progress.note(f"grid renderer {row['renderer']}: {row['grids_per_s']:,.0f} grids/s")
    if args.checkpoint is not None:
        weights = checkpoint.load(args.checkpoint)[1]
    else:
        weights = backends[0].weights(backends[0].build(cfg, seed=0))
    result["weight_variants"] = weight_variants(cfg, weights) if not cfg.quantization else []
    result["cache_variants"] = cache_variants(backends[0], cfg, batch, max(lengths))
    order = list(result["frameworks"])  # the report reads mode by mode; the runs went length by length
    modes = ("absorbed", "expanded", "uncached")
    result["rows"].sort(
        key=lambda r: (
            order.index(r["framework"]),
            list(ATTENTION).index(r["attention"]),
            modes.index(r["mode"]),
            r["length"],
        )
    )
    result["speedups"] = speedups(result["rows"])
    result["machine"]["load_average_after"] = load_average()
    progress.close()
    report.emit(result, args.json, args.plot)
