"""`mla-mnist bench`: generation throughput with and without the cache, MLA vs MHA, in each framework.

Every generation is forced to its full length (stop=False), so each row does the same work; each number is
the median of --repeats timed runs, after one warm-up run per framework, attention and mode. The machine's
own fp32 matmul rate is measured in the same run, so the encoder's achieved FLOP/s can be read as a fraction
of what this machine can do.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from convert import checkpoint
from convert.config import ModelConfig
from convert.errors import UserError
from convert.training import TrainConfig
from mnist_grid.tokens import FINISH, PAD, START

from .backends import FRAMEWORKS, Backend, installed

# cached: the latent cache read in the absorbed form (MLA) or the K/V cache (MHA); expanded: the same latent
# cache, but K/V expanded from it every step and the cross-attention K/V expanded once (MLA only);
# uncached: the original algorithm, the whole prefix re-run every step.
MODES = {"mla": ("cached", "expanded", "uncached"), "mha": ("cached", "uncached")}
ATTENTIONS = ("mla", "mha")
COLUMNS = ("samples_per_s", "tokens_per_s", "encoder_ms", "decode_ms_per_token", "cache_bytes", "peak_memory_bytes")


# ---- analytic FLOPs ----------------------------------------------------------------------------------
def encoder_flops(cfg: ModelConfig) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image through the encoder; norms, softmax and GELU not counted.

    T = enc_tokens (patches + class token), d = d_model, H = heads, hd = head_dim, r = rope_dim:
      patch embed         2 * patches * patch^2 * d
      per layer, MLA      2T * (d*q_rank + q_rank*H*hd + d*(kv_rank + r) + kv_rank*H*(hd - r + hd) + H*hd*d)
      per layer, MHA      2T * 4*d*d                                  (q, k, v, o projections)
      attention           2 * H*T*T*hd  (Q K^T)  +  2 * H*T*T*hd  (P V)
      MLP                 2T * 2*d*(mlp_ratio*d)
    """
    t, d, h, hd = cfg.enc_tokens, cfg.d_model, cfg.heads, cfg.head_dim
    if cfg.attention == "mla":
        proj = (d * cfg.enc_q_rank + cfg.enc_q_rank * h * hd + d * (cfg.enc_kv_rank + cfg.rope_dim)
                + cfg.enc_kv_rank * h * (cfg.nope_dim + hd) + h * hd * d)
    else:
        proj = 4 * d * d
    mlp = 2 * d * cfg.mlp_ratio * d
    attention = 2 * 2 * h * t * t * hd
    layer = 2 * t * (proj + mlp) + attention
    return 2 * cfg.num_patches * cfg.patch ** 2 * d + cfg.enc_layers * layer


# ---- one framework -----------------------------------------------------------------------------------
class Runner:
    """Times one framework: syncs where it computes asynchronously, measures its peak memory."""

    def __init__(self, framework: str, device: str, threads: int | None = None):
        if framework == "torch":
            import torch

            if threads:
                torch.set_num_threads(threads)
            if device == "gpu":
                device = "mps" if not torch.cuda.is_available() and torch.backends.mps.is_available() else "cuda"
        elif framework == "mlx":
            device = {"cuda": "gpu", "mps": "gpu"}.get(device, device)
            import mlx.core as mx

            if device == "gpu" and not mx.is_available(mx.gpu):
                raise UserError("--device gpu asked for, but this MLX has no GPU backend: use --device cpu")
        self.backend = b = Backend(framework, device)
        self.name, self.fw = framework, b.fw
        self.cuda = framework == "torch" and str(b.device).startswith("cuda")
        self.mps = framework == "torch" and str(b.device) == "mps"
        from importlib import import_module

        self.generate = import_module(f"{b.fw.__name__}.generate").generate

    def sync(self, *arrays):
        if self.name == "mlx":
            self.backend.mx.eval(*arrays)
        elif self.cuda:
            self.backend.torch.cuda.synchronize()
        elif self.mps:
            self.backend.torch.mps.synchronize()

    def matmul_gflops(self, repeats: int) -> float:
        n = 1024 if str(self.backend.device) in ("cpu", "Device(cpu, 0)") else 4096  # big enough to fill a GPU
        a = self.backend.array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
        times = []
        for i in range(repeats + 2):  # the first two warm up (allocation, kernel choice)
            start = time.perf_counter()
            self.sync(a @ a)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 2 * n ** 3 / statistics.median(times) / 1e9

    # ---- peak memory: the framework's own counter where it has one, else the process's peak RSS --------
    def peak_memory(self, fn):
        """(fn(), {peak_memory_bytes, peak_memory_method, ...}) for one call of fn."""
        if self.name == "mlx":
            mx = self.backend.mx
            mx.reset_peak_memory()
            out = fn()
            return out, {"peak_memory_bytes": mx.get_peak_memory(),
                    "peak_memory_method": "mx.get_peak_memory (all MLX arrays, weights included)"}
        if self.cuda:
            torch = self.backend.torch
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            return out, {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
                    "peak_memory_method": "torch.cuda.max_memory_allocated (weights included)"}
        return _rss_peak(fn)


def _rss_hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _rss_peak(fn):
    """Torch on a CPU has no allocation counter: the process's peak resident memory during fn, and its growth."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the high-water mark to the current RSS
        before = _rss_hwm_kib()  # the reset mark itself: the high-water mark only grows from here
        out = fn()
        peak = _rss_hwm_kib()
        method = "process peak RSS (VmHWM, reset before the run; interpreter and libraries included)"
    except OSError:  # no /proc: the all-time peak, which a run below it does not move
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "process all-time peak RSS (getrusage ru_maxrss; interpreter and libraries included)"
    return out, {"peak_memory_bytes": 1024 * peak, "peak_memory_above_start_bytes": 1024 * (peak - before),
            "peak_memory_method": method}


# ---- measurements ------------------------------------------------------------------------------------
def _generation_rows(players, length, repeats, warm_up):
    """Every player (runner, model, images, mode) at one length, the repeats interleaved (A B C, A B C, ...) so
    that a slow spell of a shared machine falls on every player alike: the ratios between modes, and between
    frameworks, are measured side by side. Per player: median seconds of a forced-length generation and of the
    encoder inside it, the median of their difference, the cache it held, and the peak memory of its last run."""
    enc_times = []

    def timed(runner, encode):
        def timed_encode(x):
            start = time.perf_counter()
            out = encode(x)
            runner.sync(out)
            enc_times.append(time.perf_counter() - start)
            return out
        return timed_encode

    def once(runner, model, images, mode):
        enc_times.clear()
        start = time.perf_counter()
        out, dc = runner.generate(model, images, max_length=length, stop=False, cache=mode != "uncached",
                                  absorb=mode == "cached", return_cache=True)
        runner.sync(out)
        return dc, time.perf_counter() - start, enc_times[0]

    models = {id(model): (runner, model) for runner, model, _, _ in players}
    for runner, model in models.values():  # an instance attribute: generate's own call is timed, nothing else
        model.encode = timed(runner, model.encode)
    runs, memory = [[] for _ in players], [None] * len(players)
    try:
        for player in players if warm_up else ():
            once(*player)
        for _ in range(repeats - 1):
            for i, player in enumerate(players):
                runs[i].append(once(*player))
        for i, player in enumerate(players):  # the last round also reads the peak memory
            run, memory[i] = player[0].peak_memory(lambda: once(*player))
            runs[i].append(run)
    finally:
        for _, model in models.values():
            del model.encode
    out = []
    for timed_runs, mem in zip(runs, memory):
        totals, encs = [t for _, t, _ in timed_runs], [e for _, _, e in timed_runs]
        out.append((statistics.median(totals), statistics.median(encs),
                    statistics.median(t - e for t, e in zip(totals, encs)), timed_runs[-1][0], mem))
    return out


def _cross_attention_us(runner, model, batch, calls=200):
    """One decoding step of the first decoder layer's cross-attention, in microseconds (median of `calls`):
    attending in latent space (absorbed) against K/V expanded once per image."""
    cfg, b = model.config, runner.backend
    rng = np.random.default_rng(0)
    enc = b.array(rng.standard_normal((batch, cfg.enc_tokens, cfg.d_model), dtype=np.float32))
    x = b.array(rng.standard_normal((batch, 1, cfg.d_model), dtype=np.float32))
    if runner.name == "torch":
        enc, x = enc.to(model.head.weight.dtype), x.to(model.head.weight.dtype)
        no_grad = b.torch.no_grad()
    else:
        enc, x = enc.astype(model.head.weight.dtype), x.astype(model.head.weight.dtype)
        no_grad = contextlib.nullcontext()  # MLX builds no graph for gradients unless asked
    layer, out = model.decoder[0].cross_attn, {}
    with no_grad:
        for name, absorb in (("latent", True), ("expanded", False)):
            memory = layer.memory(enc, absorb)
            runner.sync(*memory.values())
            times = []
            for i in range(calls + 10):  # ten warm-up calls
                start = time.perf_counter()
                runner.sync(layer(x, memory))
                if i >= 10:
                    times.append(time.perf_counter() - start)
            out[name] = 1e6 * statistics.median(times)
    return out


# ---- weight and cache variants (quantization) -----------------------------------------------------------
WEIGHT_VARIANTS = (("float32", None, None), ("float16", None, None), ("8-bit, groups of 64", 8, 64),
                   ("4-bit, groups of 32", 4, 32))


def weight_variants(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> list[dict]:
    """File size and stored weight bytes of the model saved as each variant (quantized ones need MLX; scales
    and unquantized tensors in float16, as `convert --quantize` writes them)."""
    import tempfile

    from convert import formats, safetensors_np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits, group in WEIGHT_VARIANTS:
            out, dtype, vcfg = weights, ("float16" if name != "float32" else "float32"), cfg
            if bits is not None:
                try:
                    out, _ = formats.quantize_weights(weights, dtype, bits, group)
                except UserError as e:  # no MLX: the float rows still stand
                    rows.append({"variant": name, "skipped": str(e)})
                    continue
                vcfg = cfg.replace(quantization={"bits": bits, "group_size": group})
            path = checkpoint.save(Path(tmp) / name.split(",")[0], vcfg, out, dtype=dtype)
            stored, _, _ = safetensors_np.read(path / checkpoint.WEIGHTS, upcast_bf16=False)
            rows.append({"variant": name, "file_bytes": (path / checkpoint.WEIGHTS).stat().st_size,
                         "weight_bytes": sum(a.nbytes for a in stored.values())})
    return rows


def cache_variants(runner, cfg: ModelConfig, batch: int, length: int) -> list[dict]:
    """Bytes of the decoder self-attention cache for `length` positions, read from real cache objects: MLA latent
    in float32 / float16, the int8 latent (per-token scale, k_pe in the model dtype), and MHA's K/V in float32."""
    b, rows = runner.backend, []
    for name, attention, dtype, quantized in (("MHA K/V, float32", "mha", "float32", False),
                                              ("MLA latent, float32", "mla", "float32", False),
                                              ("MLA latent, float16", "mla", "float16", False),
                                              ("MLA int8 latent, float32 model", "mla", "float32", True),
                                              ("MLA int8 latent, float16 model", "mla", "float16", True)):
        model = _cast(runner, b.build(cfg.replace(attention=attention), seed=0), dtype)
        dc = model.new_cache(batch, length, [], quantized)
        rows.append({"cache": name, "bytes": dc.self_nbytes,
                     "bytes_per_position_per_layer": dc.self_nbytes // (batch * length * cfg.dec_layers)})
    return rows


def _synthetic_batch(cfg, batch, seed=0):
    """Random images and full-length token rows (<start> grid^2 digits <finish>): throughput only."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch, cfg.image_size, cfg.image_size), dtype=np.float32)
    tokens = np.full((batch, cfg.max_tokens), PAD, dtype=np.int64)
    tokens[:, 0], tokens[:, -1] = START, FINISH
    tokens[:, 1:-1] = rng.integers(0, 10, (batch, cfg.max_tokens - 2))
    return images, tokens


def _training_samples_per_s(runners, cfg, batch, steps, rounds=3):
    """Samples/s of each framework's training step. The frameworks take turns, `rounds` rounds of
    steps // rounds steps each, and each keeps its median round: side by side, like the generation rows."""
    rounds = min(rounds, steps)
    per_round = steps // rounds
    images, tokens = _synthetic_batch(cfg, batch)
    trainers = []
    for runner in runners:
        model = runner.backend.build(cfg, seed=0)
        trainer = runner.backend.Trainer(model, TrainConfig(lr=1e-4, warmup_steps=0, total_steps=steps + 2),
                                         runner.backend.device)
        for _ in range(2):  # warm-up (MLX compiles its step on the first call)
            float(trainer.step(images, tokens)[0])
        trainers.append(trainer)
    rates = [[] for _ in runners]
    for _ in range(rounds):
        for trainer, rate in zip(trainers, rates):
            start = time.perf_counter()
            for _ in range(per_round):
                loss, _ = trainer.step(images, tokens)
            float(loss)  # waits for the last step
            rate.append(per_round * batch / (time.perf_counter() - start))
    return [statistics.median(rate) for rate in rates]


def _model(runner, cfg, attention, ckpt, dtype):
    """The checkpoint's weights for its own attention kind, random weights for the other; in `dtype`."""
    b = runner.backend
    if ckpt is not None and cfg.attention == attention:
        return b.load(ckpt, dtype=dtype), "checkpoint"
    return _cast(runner, b.build(cfg.replace(attention=attention), seed=0), dtype), "random"


def _cast(runner, model, dtype: str):
    """The model's weights in `dtype` (a name: float32, float16, bfloat16)."""
    b = runner.backend
    if runner.name == "torch":
        model.to(dtype=getattr(b.torch, dtype))
    else:
        model.set_dtype(getattr(b.mx, dtype))
    return model


def _parse_list(text, flag, parse, allowed=None):
    try:
        items = [parse(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        items = []
    if not items or (allowed and set(items) - set(allowed)):
        raise UserError(f"{flag} {text!r}: give a comma-separated list"
                        + (f" of {', '.join(allowed)}" if allowed else " of integers >= 2"))
    return items


def run(args):
    lengths = _parse_list(args.lengths, "--lengths", int)
    if min(lengths) < 2:
        raise UserError(f"--lengths {args.lengths!r}: every length must be >= 2 (<start> plus one token)")
    wanted = _parse_list(args.frameworks, "--frameworks", str, FRAMEWORKS)
    runners, problems = [], []
    for fw in dict.fromkeys(wanted):
        try:
            if not installed(fw):
                raise UserError(f"{fw} is not installed")
            runners.append(Runner(fw, args.device, args.threads))
        except UserError as e:  # the other framework may still run
            problems.append(f"no {fw} rows: {e}")
    if not runners:
        raise UserError("; ".join(problems))
    for line in problems:
        print(f"({line})")
    if args.checkpoint is not None:
        cfg, _ = checkpoint.read_config(args.checkpoint)
        source = str(args.checkpoint)
    else:
        cfg, source = ModelConfig.preset(args.preset), f"random weights of preset {args.preset}"
    b = args.batch_size
    images = np.random.default_rng(0).random((b, cfg.image_size, cfg.image_size), dtype=np.float32)
    result = {"machine": _machine(), "model": source, "config": cfg.to_dict(), "batch_size": b, "dtype": args.dtype,
              "lengths": lengths, "repeats": args.repeats, "frameworks": {}, "rows": []}
    # The matmul rate of each framework is sampled before and between the lengths and its median kept: the
    # encoder's share of it then compares two medians over the same stretch of time.
    matmul, enc_ms = {}, {}
    for runner in runners:
        info = result["frameworks"][runner.name] = {"device": str(runner.backend.device), **_versions(runner),
                                                    "encoder": {}}
        matmul[runner.name] = [runner.matmul_gflops(max(args.repeats, 3))]
        _progress(f"{runner.name} on {info['device']}: fp32 matmul {matmul[runner.name][0]:.1f} GFLOP/s")
    for attention in ATTENTIONS:
        built = [(runner, *_model(runner, cfg, attention, args.checkpoint, args.dtype)) for runner in runners]
        players = [(runner, model, runner.backend.array(images), mode)
                   for runner, model, _ in built for mode in MODES[attention]]
        weights_of = {runner.name: weights for runner, _, weights in built}
        for length in lengths:  # one warm-up per player (at the first length) readies every kernel
            rows = _generation_rows(players, length, args.repeats, warm_up=length == lengths[0])
            for (runner, _, _, mode), (total, enc, decode, dc, memory) in zip(players, rows):
                fw = runner.name
                enc_ms.setdefault((fw, attention), []).append(1e3 * enc)
                result["rows"].append({
                    "framework": fw, "cache": mode, "attention": attention, "weights": weights_of[fw],
                    "length": length, "samples_per_s": b / total, "tokens_per_s": b * (length - 1) / total,
                    "encoder_ms": 1e3 * enc, "decode_ms_per_token": 1e3 * decode / (length - 1),
                    "cache_bytes": dc.nbytes if dc is not None else None,
                    "self_cache_bytes": dc.self_nbytes if dc is not None else None,
                    "cross_cache_bytes": dc.cross_nbytes if dc is not None else None,
                    **memory})
                _progress(f"{fw} {mode} {attention} length {length}: {b / total:.2f} samples/s")
            for runner in runners:
                matmul[runner.name].append(runner.matmul_gflops(3))
        flops = encoder_flops(cfg.replace(attention=attention)) * b
        for runner, model, _ in built:
            info, ms = result["frameworks"][runner.name], statistics.median(enc_ms[(runner.name, attention)])
            if attention == "mla":
                info["cross_attention_us"] = _cross_attention_us(runner, model, b)
            info["encoder"][attention] = {"gflop_per_batch": flops / 1e9, "median_ms": ms,
                                          "gflops": flops / (ms / 1e3) / 1e9}
    for runner in runners:
        info = result["frameworks"][runner.name]
        info["matmul_gflops"], info["matmul_gflops_samples"] = statistics.median(matmul[runner.name]), matmul[runner.name]
        for e in info["encoder"].values():
            e["fraction_of_matmul"] = e["gflops"] / info["matmul_gflops"]
    if args.train_steps:
        tb = args.train_batch_size or b
        for runner, rate in zip(runners, _training_samples_per_s(runners, cfg, tb, args.train_steps)):
            info = result["frameworks"][runner.name]
            info["train_samples_per_s"], info["train_steps"], info["train_batch_size"] = rate, args.train_steps, tb
            _progress(f"{runner.name} training: {rate:.2f} samples/s")
    if args.checkpoint is not None:
        weights = checkpoint.load(args.checkpoint)[1]
    else:
        weights = runners[0].backend.weights(runners[0].backend.build(cfg, seed=0))
    result["weight_variants"] = weight_variants(cfg, weights) if not cfg.quantization else []
    result["cache_variants"] = cache_variants(runners[0], cfg, b, max(lengths))
    order = list(result["frameworks"])  # the report reads mode by mode; the runs went length by length
    result["rows"].sort(key=lambda r: (order.index(r["framework"]), ATTENTIONS.index(r["attention"]),
                                       MODES[r["attention"]].index(r["cache"]), r["length"]))
    result["speedups"] = _speedups(result["rows"])
    result["machine"]["load_average_after"] = _load()
    print(format_report(result))
    if args.json is not None:
        text = json.dumps(result, indent=1)
        _write(args.json, lambda f: f.write(text.encode()))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot(result, args.plot)
        print(f"wrote {args.plot}")


def _progress(line):
    print(line, file=sys.stderr, flush=True)  # stdout stays the report


def _write(path: Path, write_fn):
    """write_fn(f) into `path` atomically (a rerun never leaves a half-written JSON or plot behind)."""
    from mnist_grid.images import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    atomic_write(path, write_fn)


def _speedups(rows):
    """Cached (absorbed for MLA) over uncached samples/s, per framework, attention and length."""
    by = {(r["framework"], r["attention"], r["length"], r["cache"]): r["samples_per_s"] for r in rows}
    return [{"framework": fw, "attention": a, "length": n, "cached_over_uncached": v / by[(fw, a, n, "uncached")]}
            for (fw, a, n, mode), v in by.items() if mode == "cached"]


def _machine():
    out = {"platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
           "load_average_before": _load()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        out["cpu"] = re.search(r"model name\s*:\s*(.*)", text).group(1)
        out["cpus"] = text.count("processor\t:")
    except (OSError, AttributeError):
        pass
    return out


def _load():
    """1-minute load average: other processes' share of the cores during the run (timings are wall clock)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _versions(runner):
    """Framework version and, where the framework can tell, the device's own name (a GPU's model)."""
    if runner.name == "torch":
        torch = runner.backend.torch
        out = {"version": torch.__version__, "threads": torch.get_num_threads()}
        if runner.cuda:
            out["device_name"] = torch.cuda.get_device_name()
        return out
    mx = runner.backend.mx
    out = {"version": mx.__version__}
    try:
        out["device_name"] = mx.device_info().get("device_name")
    except (AttributeError, RuntimeError):  # older MLX, or a backend without the query
        pass
    return out


# ---- report ------------------------------------------------------------------------------------------
def _num(v, digits=1):
    if v is None:
        return "-"
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def format_report(result) -> str:
    m = result["machine"]
    lines = [f"model: {result['model']} ({result['dtype']}), batch {result['batch_size']}, "
             f"median of {result['repeats']} (modes interleaved), "
             f"forced lengths {result['lengths']}",
             f"machine: {m.get('cpu', m['processor'])}, {m.get('cpus', '?')} CPUs, 1-min load average "
             f"{m['load_average_before']} before, {m.get('load_average_after')} after", "",
             "| framework | cache | attention | length | samples/s | tokens/s | encoder ms | decode ms/token "
             "| cache bytes | peak memory MiB |", "|" + "---|" * 10]
    for r in result["rows"]:
        mem = f"{r['peak_memory_bytes'] / 2 ** 20:.1f}"
        if r.get("peak_memory_above_start_bytes") is not None:
            mem += f" (+{r['peak_memory_above_start_bytes'] / 2 ** 20:.1f})"
        lines.append(f"| {r['framework']} | {r['cache']} | {r['attention']} | {r['length']} | "
                     f"{_num(r['samples_per_s'], 2)} | {_num(r['tokens_per_s'])} | {_num(r['encoder_ms'])} | "
                     f"{_num(r['decode_ms_per_token'], 2)} | {_num(r['cache_bytes'], 0)} | {mem} |")
    lines += ["", "| framework | attention | length | cached / uncached samples/s |", "|---|---|---|---|"]
    lines += [f"| {s['framework']} | {s['attention']} | {s['length']} | {s['cached_over_uncached']:.2f}x |"
              for s in result["speedups"]]
    lines += ["", "| framework | device | fp32 matmul GFLOP/s | encoder (mla) GFLOP/s | fraction | "
              "encoder (mha) GFLOP/s | fraction | training samples/s |", "|" + "---|" * 8]
    for fw, info in result["frameworks"].items():
        e = info["encoder"]
        device = info["device"] + (f" ({info['device_name']})" if info.get("device_name") else "")
        lines.append(f"| {fw} | {device} | {info['matmul_gflops']:.1f} | {e['mla']['gflops']:.1f} | "
                     f"{e['mla']['fraction_of_matmul']:.0%} | {e['mha']['gflops']:.1f} | "
                     f"{e['mha']['fraction_of_matmul']:.0%} | {_num(info.get('train_samples_per_s'), 2)}"
                     + (f" (batch {info['train_batch_size']})" if "train_batch_size" in info else "") + " |")
    if result.get("weight_variants"):
        lines += ["", "| weights | file bytes | stored weight bytes |", "|---|---|---|"]
        lines += [f"| {w['variant']} | {w['file_bytes']:,} | {w['weight_bytes']:,} |" if "file_bytes" in w
                  else f"| {w['variant']} | - | - ({w['skipped']}) |" for w in result["weight_variants"]]
    if result.get("cache_variants"):
        fp16 = next(c["bytes"] for c in result["cache_variants"] if c["cache"] == "MLA latent, float16")
        mha = next(c["bytes"] for c in result["cache_variants"] if c["cache"] == "MHA K/V, float32")
        lines += ["", f"| self-attention cache, {max(result['lengths'])} positions | bytes | per position per layer "
                  "| / MLA float16 | / MHA float32 |", "|---|---|---|---|---|"]
        lines += [f"| {c['cache']} | {c['bytes']:,} | {c['bytes_per_position_per_layer']} | "
                  f"{c['bytes'] / fp16:.2f} | {c['bytes'] / mha:.3f} |" for c in result["cache_variants"]]
    for fw, info in result["frameworks"].items():
        if "cross_attention_us" in info:
            c = info["cross_attention_us"]
            lines.append(f"{fw}: one MLA cross-attention decoding step (layer 0): latent (absorbed) "
                         f"{c['latent']:.0f} us, K/V expanded once {c['expanded']:.0f} us")
    methods = sorted({r["peak_memory_method"] for r in result["rows"]})
    lines += ["", "peak memory: " + "; ".join(methods) + "; (+x): growth during the run"]
    return "\n".join(lines)


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r["framework"], r["cache"], r["attention"]) for r in result["rows"]})
    for fw, mode, attention in keys:
        rows = [r for r in result["rows"] if (r["framework"], r["cache"], r["attention"]) == (fw, mode, attention)]
        style = {"cached": "-", "expanded": ":", "uncached": "--"}[mode]
        speed.plot([r["length"] for r in rows], [r["tokens_per_s"] for r in rows], style, marker="o",
                   label=f"{fw} {mode} {attention}")
        if mode == "cached" and fw == keys[0][0]:  # the same bytes in every framework
            mem.plot([r["length"] for r in rows], [r["self_cache_bytes"] / 2 ** 10 for r in rows], marker="o",
                     label=f"{attention} self-attention cache")
            mem.axhline(rows[0]["cross_cache_bytes"] / 2 ** 10, ls=":", color=mem.lines[-1].get_color(),
                        label=f"{attention} cross-attention memory")
    speed.set(xlabel="generated length (tokens)", ylabel="tokens/s", yscale="log",
              title=f"generation, batch {result['batch_size']}")
    speed.legend(fontsize=7)
    mem.set(xlabel="generated length (tokens)", ylabel="KiB", yscale="log", title="decoding cache size")
    mem.legend(fontsize=7)
    fig.tight_layout()
    try:
        _write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
