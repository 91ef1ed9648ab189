"""The fixed-shape decoder (mla_torch.static_decode) in torch: the same tokens as generate's loop, a refresh per
run, and clear errors where it does not apply. On CPU only the eager step runs; the CUDA graph is the same step."""

import pytest
import torch

import mla_torch
from convert import ModelConfig, checkpoint
from mla_torch.static_decode import StaticDecoder, static_decoder
from mnist_grid import FINISH, GridStream


@pytest.fixture(scope="module")
def model():
    """A random tiny model that rarely finishes early: the comparison runs over whole rows, not PAD."""
    m = mla_torch.build(ModelConfig.preset("tiny"), seed=1).eval()
    with torch.no_grad():
        m.head.bias[FINISH] -= 4.0
    return m


def _images(model, batch, seed):
    size = model.config.image_size
    return torch.rand(batch, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("max_length", [5, None])
@pytest.mark.parametrize("stop", [True, False])
def test_eager_static_tokens_equal_the_loop(model, batch, max_length, stop):
    images = _images(model, batch, seed=batch)
    want = mla_torch.generate(model, images, max_length=max_length, stop=stop, mode="absorbed", static="off")
    got = mla_torch.generate(model, images, max_length=max_length, stop=stop, static="eager")
    assert got.dtype == torch.long and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_shipped_checkpoint_reads_the_same_through_the_static_step():
    shipped = mla_torch.load(checkpoint.SHIPPED)
    images, targets = GridStream("test", shipped.config.grid, 0).fixed(16, seed=5)
    images = torch.as_tensor(images)
    want = mla_torch.generate(shipped, images, static="off")
    for stop in (True, False):
        torch.testing.assert_close(mla_torch.generate(shipped, images, static="eager", stop=stop), want, rtol=0, atol=0)
    encoded = shipped.encode(images)
    torch.testing.assert_close(mla_torch.generate(shipped, encoded=encoded, static="eager"), want, rtol=0, atol=0)
    # Real, varied read-outs that end at different lengths: early stopping and PAD after FINISH both matter.
    assert (want.numpy() == targets).all(axis=1).mean() > 0.5
    assert len({(row == FINISH).nonzero()[0].item() for row in want}) > 1


def test_each_run_decodes_its_own_batch_and_the_current_weights(model):
    a, b = _images(model, 2, seed=10), _images(model, 2, seed=11)
    decoder = static_decoder(model, 2, 8, "eager")
    assert static_decoder(model, 2, 8, "eager") is decoder  # kept for the next call

    def loop():
        return mla_torch.generate(model, a, max_length=8, static="off")

    out_a, out_b = decoder.run(model.encode(a)), decoder.run(model.encode(b))
    torch.testing.assert_close(out_a, loop(), rtol=0, atol=0)
    torch.testing.assert_close(out_b, mla_torch.generate(model, b, max_length=8, static="off"), rtol=0, atol=0)
    assert (out_a != out_b).any()
    with torch.no_grad():  # weights the static decoder folds (kv_b_proj) and reads directly (the head)
        layer = model.decoder[0]
        saved = layer.self_attn.kv_b_proj.weight.clone(), model.head.weight.clone()
        layer.self_attn.kv_b_proj.weight.mul_(3.0)
        model.head.weight[:, :5].mul_(-2.0)
    try:
        changed = decoder.run(model.encode(a))
        torch.testing.assert_close(changed, loop(), rtol=0, atol=0)
        assert (changed != out_a).any()
    finally:
        with torch.no_grad():
            layer.self_attn.kv_b_proj.weight.copy_(saved[0])
            model.head.weight.copy_(saved[1])


def test_a_static_run_adds_no_parameters_and_keeps_few_decoders(model):
    names = list(model.state_dict()), [n for n, _ in model.named_parameters()], list(model.__dict__)
    images = _images(model, 1, seed=3)
    first = static_decoder(model, 1, 3, "eager")
    for length in range(3, 9):  # six shapes: only the last four are kept
        mla_torch.generate(model, images, max_length=length, static="eager")
    assert (list(model.state_dict()), [n for n, _ in model.named_parameters()], list(model.__dict__)) == names
    assert static_decoder(model, 1, 3, "eager") is not first
    assert static_decoder(model, 1, 8, "eager") is static_decoder(model, 1, 8, "eager")


def test_graph_needs_cuda():
    cpu = mla_torch.build(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="CUDA graph.*cpu"):
        StaticDecoder(cpu, 2, 6, "graph")
    with pytest.raises(ValueError, match="CUDA graph"):
        mla_torch.generate(cpu, _images(cpu, 2, 0), static="graph")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="expanded"), "mode 'expanded'"),
        (dict(mode="uncached"), "mode 'uncached'"),
        (dict(temperature=1.0), "temperature"),
        (dict(quantize_cache=True), "quantize_cache"),
        (dict(return_cache=True), "return_cache"),
    ],
)
def test_static_refuses_what_it_cannot_do(model, kwargs, message):
    images = _images(model, 1, 0)
    with pytest.raises(ValueError, match=message):
        mla_torch.generate(model, images, max_length=4, static="eager", **kwargs)
    mla_torch.generate(model, images, max_length=4, **kwargs)  # and None picks the loop for it on CPU


def test_other_misuse_is_one_clear_error(model):
    images = _images(model, 1, 0)
    with pytest.raises(ValueError, match="static must be"):
        mla_torch.generate(model, images, static="cuda")
    with pytest.raises(ValueError, match="how must be"):
        StaticDecoder(model, 1, 4, "off")
    with pytest.raises(ValueError, match="MLA model"):
        StaticDecoder(mla_torch.build(ModelConfig.preset("tiny", attention="mha")), 1, 4, "eager")
    with pytest.raises(ValueError, match="batches of 2"):
        StaticDecoder(model, 2, 4, "eager").run(model.encode(images))
    with pytest.raises(ValueError, match="mode 'expanded'"):  # an MHA model's default mode is the expanded cache
        mla_torch.generate(mla_torch.build(ModelConfig.preset("tiny", attention="gqa")), images, static="eager")


@pytest.mark.slow
def test_compiled_static_step_reads_the_same_tokens(model):
    """torch.compile of the step (its RoPE elementwise, for Inductor to fuse) gives the loop's tokens; on CUDA the
    same compiled step is then captured in a graph. Inductor builds it once for both calls (tens of seconds)."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("Inductor needs a C compiler on the CPU")
    for seed in (20, 21):
        images = _images(model, 2, seed=seed)
        want = mla_torch.generate(model, images, max_length=7, static="off")
        torch.testing.assert_close(
            mla_torch.generate(model, images, max_length=7, static="compiled"), want, rtol=0, atol=0
        )


def test_the_step_launches_few_operations(model):
    """On a GPU the graphed step costs about its count of kernels (~4 us each on an H200): every operation of one
    step is counted (views are free), and it stays at 26 a decoder layer plus the embedding, head and bookkeeping."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "split", "split_with_sizes", "slice", "select", "transpose", "t", "expand"}
    views |= {"unsqueeze", "squeeze", "as_strided", "permute", "alias", "detach", "reshape", "unbind"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.overloadpacket.__name__ not in views
            return func(*args, **(kwargs or {}))

    decoder = StaticDecoder(model, 2, 6, "eager")
    with torch.no_grad():
        decoder._refresh(model.encode(_images(model, 2, seed=30)))
        decoder._reset()
        with Count():
            decoder._step()
    assert Count.n <= 26 * model.config.dec_layers + 12, Count.n
