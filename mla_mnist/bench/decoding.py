"""The decoding paths side by side: the step-by-step loop ("off") against the fixed-shape step run eagerly,
captured in a graph or compiled (the backend says which its device has), each at a few batch sizes beside the
bound of the step (bytes it must read / the device's copy bandwidth; FLOPs / its matmul rate); and the grids/s
of a greedy evaluation on real test grids through each path."""

from __future__ import annotations

import statistics
import time

import numpy as np

from convert.flops import decode_step_cost
from mnist_grid import decode, evaluate

from ..evaluation import default_batch, eval_set, predict_tokens
from .timing import timed


def paths_of(backend, asked, model=None) -> tuple[str, ...]:
    """The paths this backend's device has, limited to those asked for (None: all); the loop always, first: the
    reference the others' tokens are compared with. A model without MLA's absorbed step has only the loop."""
    if model is not None and "absorbed" not in model.decode_modes:
        return ("off",)
    return tuple(p for p in backend.static_paths if p == "off" or asked is None or p in asked)


def path_rows(
    backends, models, cfg, batches, length, repeats, dtype, data_dir=None, progress=None, paths=None
) -> list[dict]:
    """Per framework and batch: ms per generated token of every path on real test grids, forced to `length`
    (stop=False, the encoder outside the clock), the paths taking turns; the first call of each path (its
    capture or compilation) timed apart; tokens compared with the loop's."""
    itemsize = 2 if dtype in ("float16", "bfloat16") else 4
    grids, _ = eval_set("test", cfg.grid, max(batches), data_dir, raw=True)
    rows = []
    for backend, model in zip(backends, models):
        bandwidth, peak = backend.copy_gbps() * 1e9, backend.matmul_gflops(3) * 1e9
        for batch in batches:
            enc = backend.encode(model, backend.array(grids[:batch]))

            def run(path, backend=backend, model=model, enc=enc):
                return backend.generate(model, None, encoded=enc, max_length=length, stop=False, static=path)

            first, tokens, mine = {}, {}, paths_of(backend, paths)
            for path in mine:
                tokens[path], first[path] = timed(backend, lambda path=path: run(path))
            times = {path: [] for path in mine}
            for _ in range(repeats):
                for path in mine:
                    times[path].append(timed(backend, lambda path=path: run(path))[1])
            cost = decode_step_cost(cfg, batch, length, itemsize)
            bound = max(cost["bytes"] / bandwidth, cost["flops"] / peak)
            for path in mine:
                ms = 1e3 * statistics.median(times[path]) / (length - 1)
                rows.append(
                    {
                        "framework": backend.name,
                        "path": path,
                        "batch": batch,
                        "length": length,
                        "ms_per_token": ms,
                        "first_call_s": first[path],
                        "tokens_match_off": bool(np.array_equal(tokens[path], tokens["off"])),
                        "bound_ms": 1e3 * bound,
                        "step_bytes": cost["bytes"],
                        "step_flops": cost["flops"],
                        "copy_gbps": bandwidth / 1e9,
                        "matmul_gflops": peak / 1e9,
                    }
                )
                if progress is not None:
                    progress.note(f"{backend.name} {path} batch {batch}: {ms:.2f} ms/token (bound {1e3 * bound:.3f})")
    return rows


def eval_rows(backends, models, cfg, samples, batch_size, data_dir=None, progress=None, paths=None) -> list[dict]:
    """Greedy evaluation of `samples` fixed test grids (uint8, as `eval` reads them) through every path: grids/s
    of the whole read-out after one warm-up batch, and its scores."""
    images, tokens = eval_set("test", cfg.grid, samples, data_dir, raw=True)
    truth, rows = decode(tokens), []
    for backend, model in zip(backends, models):
        batch = batch_size or default_batch(backend)
        for path in paths_of(backend, paths, model):
            predict_tokens(backend, model, images[:batch], batch, static=path)  # capture / compile / warm-up
            start = time.perf_counter()
            pred = predict_tokens(backend, model, images, batch, static=path)
            seconds = time.perf_counter() - start
            m = evaluate(decode(pred), truth)
            rows.append(
                {
                    "framework": backend.name,
                    "path": path,
                    "batch": batch,
                    "samples": samples,
                    "grids_per_s": samples / seconds,
                    "exact_match": m["exact_match"],
                    "digit_accuracy": m["digit_accuracy"],
                }
            )
            if progress is not None:
                progress.note(f"{backend.name} eval {path}: {samples / seconds:,.0f} grids/s")
    return rows


def real_rows(backends, models, cfg, batch, repeats, data_dir=None, paths=None, progress=None) -> list[dict]:
    """A trained model reading `batch` real test grids of its own task, greedy, stopping once every row has written
    <finish> (what a user waits for; the encoder included), through each path, the paths taking turns: grids/s,
    seconds per batch and the tokens it generated, beside the forced-length rows."""
    images, truth = eval_set("test", cfg.grid, batch, data_dir, raw=True)
    truth, rows = decode(truth), []
    for backend, model in zip(backends, models):
        x, mine = backend.array(images), paths_of(backend, paths, model)
        for path in mine:  # warm-up: capture, compile
            backend.generate(model, x, static=path)
        times, out = {path: [] for path in mine}, {}
        for _ in range(repeats):
            for path in mine:
                out[path], seconds = timed(
                    backend, lambda path=path, b=backend, m=model, x=x: b.generate(m, x, static=path)
                )
                times[path].append(seconds)
        for path in mine:
            seconds, read = statistics.median(times[path]), decode(out[path])
            m = evaluate(read, truth)
            rows.append(
                {
                    "framework": backend.name,
                    "path": path,
                    "batch": batch,
                    "seconds_per_batch": seconds,
                    "grids_per_s": batch / seconds,
                    "mean_digits": float(np.mean([len(d) for d in read])),
                    "exact_match": m["exact_match"],
                    "digit_accuracy": m["digit_accuracy"],
                }
            )
            if progress is not None:
                progress.note(f"{backend.name} real reading {path}: {batch / seconds:,.1f} grids/s")
    return rows
