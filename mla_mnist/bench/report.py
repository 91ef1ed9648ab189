"""The benchmark's outputs: a Markdown report on stdout, the JSON of every number, a plot."""

from __future__ import annotations

import json
from pathlib import Path


def _num(value, digits=1):
    if value is None:
        return "-"
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def format_report(result) -> str:
    m = result["machine"]
    lines = [
        f"model: {result['model']} ({result['dtype']}), batch {result['batch_size']}, "
        f"median of {result['repeats']} (modes interleaved), forced lengths {result['lengths']}",
        f"machine: {m.get('cpu', m['processor'])}, {m.get('cpus', '?')} CPUs, 1-min load average "
        f"{m['load_average_before']} before, {m.get('load_average_after')} after",
        "",
        "| framework | mode | attention | length | samples/s | tokens/s | encoder ms | decode ms/token "
        "| cache bytes | peak memory MiB |",
        "|" + "---|" * 10,
    ]
    for r in result["rows"]:
        mem = f"{r['peak_memory_bytes'] / 2**20:.1f}"
        if r.get("peak_memory_above_start_bytes") is not None:
            mem += f" (+{r['peak_memory_above_start_bytes'] / 2**20:.1f})"
        lines.append(
            f"| {r['framework']} | {r['mode']} | {r['attention']} | {r['length']} | "
            f"{_num(r['samples_per_s'], 2)} | {_num(r['tokens_per_s'])} | {_num(r['encoder_ms'])} | "
            f"{_num(r['decode_ms_per_token'], 2)} | {_num(r['cache_bytes'], 0)} | {mem} |"
        )
    lines += [
        "",
        "| framework | attention | length | cached mode | cached / uncached samples/s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['framework']} | {s['attention']} | {s['length']} | {s['mode']} | {s['cached_over_uncached']:.2f}x |"
        for s in result["speedups"]
    ]
    if result.get("decode_paths"):
        first = result["decode_paths"][0]
        lines += [
            "",
            f"decoding paths, {first['length']} forced tokens, encoder excluded; bound = max(bytes a step reads / "
            "copy bandwidth, FLOPs / fp32 matmul rate), both measured in this run",
            "",
            "| framework | batch | path | ms/token | bound ms | x bound | first call s | tokens = loop's |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['framework']} | {r['batch']} | {r['path']} | {r['ms_per_token']:.3f} | {r['bound_ms']:.4f} | "
            f"{r['ms_per_token'] / r['bound_ms']:,.0f} | {r['first_call_s']:.2f} | "
            f"{'yes' if r['tokens_match_off'] else 'NO'} |"
            for r in result["decode_paths"]
        ]
    if result.get("real"):
        lines += [
            "",
            "reading real test grids of the model's task: greedy, stopping at <finish>, encoder included",
            "",
            "| framework | path | batch | grids/s | s per batch | mean digits read | exact match |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['framework']} | {r['path']} | {r['batch']} | {r['grids_per_s']:,.1f} | "
            f"{r['seconds_per_batch']:.3f} | {r['mean_digits']:.1f} | {r['exact_match']:.2%} |"
            for r in result["real"]
        ]
    if result.get("eval"):
        lines += ["", "| framework | eval path | batch | grids | grids/s | exact match | digit accuracy |"]
        lines += ["|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r['framework']} | {r['path']} | {r['batch']} | {r['samples']} | {r['grids_per_s']:,.0f} | "
            f"{r['exact_match']:.2%} | {r['digit_accuracy']:.2%} |"
            for r in result["eval"]
        ]
    attentions = list(next(iter(result["frameworks"].values()))["encoder"])
    lines += [
        "",
        "| framework | device | fp32 matmul GFLOP/s | "
        + " | ".join(f"encoder ({a}) GFLOP/s | fraction" for a in attentions)
        + " | training samples/s |",
        "|" + "---|" * (4 + 2 * len(attentions)),
    ]
    for name, info in result["frameworks"].items():
        e = info["encoder"]
        device = info["device"] + (f" ({info['device_name']})" if info.get("device_name") else "")
        encoders = " | ".join(f"{e[a]['gflops']:.1f} | {e[a]['fraction_of_matmul']:.0%}" for a in attentions)
        lines.append(
            f"| {name} | {device} | {info['matmul_gflops']:.1f} | {encoders} | "
            f"{_num(info.get('train_samples_per_s'), 2)}"
            + (
                f" (batch {info['train_batch_size']}, {info['train_dtype']}, peak "
                f"{info['train_peak_memory_bytes'] / 2**30:.2f} GiB)"
                if "train_batch_size" in info
                else ""
            )
            + " |"
        )
    if result.get("render"):
        lines += ["", "| training grids composed by | batch | augmentation | grids/s |", "|---|---|---|---|"]
        lines += [
            f"| {r['renderer']} | {r['batch']} | {r['augment']} | {r['grids_per_s']:,.0f} |" for r in result["render"]
        ]
    if result.get("weight_variants"):
        lines += ["", "| weights | file bytes | stored weight bytes |", "|---|---|---|"]
        lines += [
            f"| {w['variant']} | {w['file_bytes']:,} | {w['weight_bytes']:,} |"
            if "file_bytes" in w
            else f"| {w['variant']} | - | - ({w['skipped']}) |"
            for w in result["weight_variants"]
        ]
    if result.get("cache_variants"):
        fp16 = next(c["bytes"] for c in result["cache_variants"] if c["cache"] == "MLA latent, float16")
        mha = next(c["bytes"] for c in result["cache_variants"] if c["cache"] == "MHA K/V, float32")
        lines += [
            "",
            f"| self-attention cache, {max(result['lengths'])} positions | bytes | per position per layer "
            "| / MLA float16 | / MHA float32 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['cache']} | {c['bytes']:,} | {c['bytes_per_position_per_layer']} | "
            f"{c['bytes'] / fp16:.2f} | {c['bytes'] / mha:.3f} |"
            for c in result["cache_variants"]
        ]
    for name, info in result["frameworks"].items():
        if "cross_attention_us" in info:
            c = info["cross_attention_us"]
            lines.append(
                f"{name}: one MLA cross-attention decoding step (layer 0): latent (absorbed) "
                f"{c['latent']:.0f} us, K/V expanded once {c['expanded']:.0f} us"
            )
    methods = sorted({r["peak_memory_method"] for r in result["rows"]})
    lines += ["", "peak memory: " + "; ".join(methods) + "; (+x): growth during the run"]
    return "\n".join(lines)


def write(path: Path, write_fn):
    """write_fn(f) into `path` atomically, its folder made if missing (a rerun never leaves a half-written file)."""
    from convert.files import atomic_write

    atomic_write(path, write_fn, binary_file=True)


def plot(result, path: Path):
    """Tokens/s per length (colour: framework and attention; line style: decoding mode) and cache sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, mem) = plt.subplots(1, 2, figsize=(13, 4.8))
    series = sorted({(r["framework"], r["attention"]) for r in result["rows"]})
    colours = {key: plt.cm.tab10(i % 10) for i, key in enumerate(series)}
    styles = {"absorbed": "-", "expanded": ":", "uncached": "--"}
    first_framework = series[0][0]
    for key in series:
        modes = dict.fromkeys(r["mode"] for r in result["rows"] if (r["framework"], r["attention"]) == key)
        for mode in modes:
            rows = [r for r in result["rows"] if (r["framework"], r["attention"], r["mode"]) == (*key, mode)]
            speed.plot(
                [r["length"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                styles[mode],
                marker="o",
                color=colours[key],
                label=f"{key[0]} {key[1]} {mode}",
            )
        if key[0] == first_framework:  # the same bytes in every framework
            rows = [
                r for r in result["rows"] if (r["framework"], r["attention"], r["mode"]) == (*key, next(iter(modes)))
            ]
            mem.plot(
                [r["length"] for r in rows],
                [r["self_cache_bytes"] / 2**10 for r in rows],
                marker="o",
                color=colours[key],
                label=f"{key[1]} self-attention cache",
            )
            mem.axhline(
                rows[0]["cross_cache_bytes"] / 2**10,
                ls=":",
                color=colours[key],
                label=f"{key[1]} cross-attention memory",
            )
    devices = ", ".join(
        f"{name} on {info['device']}" + (f" ({info['device_name']})" if info.get("device_name") else "")
        for name, info in result["frameworks"].items()
    )
    speed.set(
        xlabel="generated length (tokens)",
        ylabel="tokens/s",
        yscale="log",
        title=f"generation, batch {result['batch_size']}, {result['dtype']}",
    )
    mem.set(xlabel="generated length (tokens)", ylabel="KiB", yscale="log", title="decoding cache size")
    for ax in (speed, mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the data, never over it
    fig.suptitle(f"{result['model']} — {devices}", fontsize=10)
    fig.tight_layout()
    try:
        write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def emit(result, json_path: Path | None, plot_path: Path | None):
    print(format_report(result))
    if json_path is not None:
        text = json.dumps(result, indent=1)
        write(json_path, lambda f: f.write(text.encode()))
        print(f"wrote {json_path}")
    if plot_path is not None:
        plot(result, plot_path)
        print(f"wrote {plot_path}")
