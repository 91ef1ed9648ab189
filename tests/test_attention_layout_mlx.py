"""The training step's attention layout on MLX's CUDA backend (queries padded to 128 rows so that cuDNN runs the
backward): the same function and the same gradients as unpadded attention, and off everywhere else."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import mla_mlx.attention as attention  # noqa: E402


def _qkv(t, length, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal((2, 4, n, 16)).astype(np.float32)).astype(dtype) for n in (t, length, length)]


@pytest.mark.parametrize("causal, t, length", [(False, 17, 17), (False, 20, 17), (True, 17, 17), (False, 128, 17)])
def test_padded_queries_give_the_same_attention_and_gradients(monkeypatch, causal, t, length):
    q, k, v = _qkv(t, length, mx.bfloat16)

    def loss(q, k, v):
        return (attention.attend(q, k, v, 0.25, causal=causal).astype(mx.float32) ** 2).sum()

    plain = attention.attend(q, k, v, 0.25, causal=causal), mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    monkeypatch.setattr(attention, "_PAD_QUERIES_TO", 128)  # what backward_layout sets on the CUDA backend
    padded = attention.attend(q, k, v, 0.25, causal=causal), mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert padded[0].shape == plain[0].shape == (2, 4, t, 16)
    assert float(mx.abs(plain[0] - padded[0]).max()) == 0.0
    for a, b in zip(plain[1], padded[1]):
        assert a.shape == b.shape and float(mx.abs(a - b).max()) == 0.0


def test_padding_is_off_in_float32_and_off_the_cuda_backend(monkeypatch):
    q, k, v = _qkv(17, 17, mx.float32)
    monkeypatch.setattr(attention, "_PAD_QUERIES_TO", 128)
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(
        mx.fast, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(q.shape) or real(q, *a, **kw)
    )
    attention.attend(q, k, v, 0.25)
    assert calls == [(2, 4, 17, 16)]  # float32: cuDNN's kernels are bf16/fp16 only, so nothing is padded
    monkeypatch.setattr(attention, "_PAD_QUERIES_TO", 0)
    with attention.backward_layout():  # on a CPU (or Metal) the layout stays off
        assert attention._PAD_QUERIES_TO == (128 if attention.on_cuda_backend() else 0)
    assert attention._PAD_QUERIES_TO == 0


def test_kernel_table_script_refuses_in_one_line_without_a_cuda_gpu_or_over_a_file(tmp_path):
    """scripts/kernel_table.py reads kernels through torch's CUDA profiler: elsewhere it says so (exit 2)."""
    import subprocess
    import sys
    from pathlib import Path

    torch = pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[1] / "scripts" / "kernel_table.py"
    kept = tmp_path / "table.json"
    kept.write_text("{}")
    run = subprocess.run([sys.executable, str(script), "--json", str(kept)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "exists" in run.stderr
    assert kept.read_text() == "{}"
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, str(script), "--preset", "tiny"], capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.strip() == (
            "kernel_table: needs a CUDA GPU (torch.cuda.is_available() is False)"
        )
    for bad in (["--steps", "0"], ["--batch-size", "x"], ["--top", "-1"]):
        run = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True)
        assert run.returncode == 2 and "Traceback" not in run.stderr and f"argument {bad[0]}" in run.stderr, bad
