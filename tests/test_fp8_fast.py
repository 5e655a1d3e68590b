"""The fast FP8 block quantizers (eager, compiled, C++) equal the reference bit for bit."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantscale.checkpoint import convert, dequantize
from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like
from quantscale.formats import fp8_fast
from quantscale.formats.fp8 import E4M3, E5M2, all_codes, quantize_fp8_block

SHAPES = [(256, 384), (576, 1536), (1000, 130), (1, 1), (129, 257), (128, 128)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _weight(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * 0.02
    w[: shape[0] // 3] *= 1e3  # tiles with very different ranges
    if shape[0] > 2 and shape[1] > 2:
        w[1] = 0
        w[:, 1] *= 1e-6  # values that land on E4M3 subnormals
    return w.to(dtype)


def _same(a, b):
    qa, sa = a
    qb, sb = b
    assert qa.dtype == qb.dtype and qa.shape == qb.shape
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8))
    assert sa.dtype == sb.dtype == torch.float32
    assert torch.equal(sa, sb)


def _same_nan_aside(a, b):
    """Like `_same`, but any two NaN codes (0x7f / 0xff) count as equal: torch's clamp does
    not keep a NaN's sign the same way in its vector and scalar loops."""
    ca, cb = a[0].view(torch.uint8), b[0].view(torch.uint8)
    nan = (ca & 0x7F == 0x7F) & (cb & 0x7F == 0x7F)
    assert torch.equal(torch.where(nan, 0, ca), torch.where(nan, 0, cb))
    assert torch.equal(a[1], b[1])


@pytest.fixture(scope="session")
def native():
    """The C++ op, built once per session (about 10-20 s the first time, then cached)."""
    op = fp8_fast._native()
    if op is None:
        pytest.skip("the C++ FP8 kernel cannot be built here (see the logged warning)")
    return op


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_eager_matches_reference(shape, dtype, scale_fmt):
    w = _weight(shape, dtype, seed=shape[0] + shape[1])
    _same(
        fp8_fast.quantize_fp8_block_fast(w, scale_fmt=scale_fmt, backend="eager"),
        quantize_fp8_block(w, scale_fmt=scale_fmt),
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_cpp_matches_reference(native, shape, dtype, scale_fmt):
    w = _weight(shape, dtype, seed=shape[0] + shape[1])
    expected = quantize_fp8_block(w, scale_fmt=scale_fmt)
    _same(fp8_fast.quantize_fp8_block_fast(w, scale_fmt=scale_fmt, backend="cpp"), expected)
    for group in (1, 3):  # tiles of a band taken 1 and 3 at a time, not the whole band
        _same(fp8_fast._cpp(native, w, (128, 128), scale_fmt, group), expected)


def test_cpp_random_shapes_reuse_buffers(native):
    """Random shapes one after another: output buffers come back from the kernel's pool."""
    assert torch.ops.quantscale_fp8.simd_lanes() in (1, 8, 16)
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        shape = tuple(int(x) for x in torch.randint(1, 700, (2,), generator=gen))
        dtype = DTYPES[i % 3]
        w = _weight(shape, dtype, seed=i)
        if i % 4 == 0:
            w[:128, :128] = 0  # an all-zero tile: scale 1
        for scale_fmt in (None, "ue8m0"):
            expected = quantize_fp8_block(w, scale_fmt=scale_fmt)
            _same(fp8_fast.quantize_fp8_block_fast(w, scale_fmt=scale_fmt, backend="cpp"), expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_tall_weights_read_ahead(native, threads):
    """Many bands per thread: each band's amax is read while the band before is quantized
    (up to 8 bands in a row per thread), also across NaN/inf tiles and a short last band."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (shape, dtype) in enumerate(
            [((4100, 200), torch.bfloat16), ((2304, 130), DTYPES[1])]
        ):
            w = _weight(shape, dtype, seed=i)
            w[300, 5], w[1500, 100] = float("nan"), float("inf")
            w[2000:2100] *= 1e4
            w[::128] *= 30  # each band's amax in its first row
            for scale_fmt in (None, "ue8m0"):
                _same_nan_aside(
                    fp8_fast.quantize_fp8_block_fast(w, scale_fmt=scale_fmt, backend="cpp"),
                    quantize_fp8_block(w, scale_fmt=scale_fmt),
                )
    finally:
        torch.set_num_threads(before)


def test_cpp_large_input_on_all_threads(native):
    """Inputs of 16 MB and more are split over the intra-op threads (smaller ones run on the
    calling thread): the same bytes either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = _weight((2048, 2304), torch.float32, seed=5)  # 18.9 MB
        assert w.nbytes >= 16 << 20
        _same(fp8_fast.quantize_fp8_block_fast(w, backend="cpp"), quantize_fp8_block(w))
    finally:
        torch.set_num_threads(before)


def _finite_bf16_up_to(limit: float) -> torch.Tensor:
    """Every bf16 value with |x| <= limit (both signs), as bf16."""
    codes = torch.arange(0x8000, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    pos = codes[codes.float() <= limit]
    return torch.cat([pos, -pos])


@pytest.mark.parametrize("amax", [448.0, 1.0, 3e-3])
def test_cpp_every_bf16_value_in_range(native, amax):
    """Each bf16 value up to a tile's amax, in tiles whose amax gives scale 1 (448), an inexact
    scale (1/448) and a small one: every rounding case of the division and of the cast."""
    values = _finite_bf16_up_to(amax)
    per_tile = 128 * 128 - 1
    tiles = -(-values.numel() // per_tile)
    flat = torch.zeros(tiles * per_tile, dtype=torch.bfloat16)
    flat[: values.numel()] = values
    w = torch.cat(
        [torch.full((tiles, 1), amax, dtype=torch.bfloat16), flat.reshape(tiles, per_tile)],
        dim=1,
    ).reshape(tiles * 128, 128)
    _same(fp8_fast.quantize_fp8_block_fast(w, backend="cpp"), quantize_fp8_block(w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_cpp_scale_of_every_amax(native, dtype, scale_fmt):
    """1x1 tiles over all 65536 bit patterns: every possible amax gives the reference scale
    (ue8m0 included) and inf/NaN saturate or stay NaN as in the reference."""
    w = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, -1)
    _same_nan_aside(
        fp8_fast.quantize_fp8_block_fast(w, (1, 1), scale_fmt, backend="cpp"),
        quantize_fp8_block(w, (1, 1), scale_fmt),
    )


def test_cpp_every_bf16_pattern_in_big_tiles(native):
    """All 65536 patterns shuffled into 128x128 tiles (amax inf or NaN: saturation paths)."""
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(65536, generator=gen).to(torch.int32)
    w = order.to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    _same_nan_aside(fp8_fast.quantize_fp8_block_fast(w, backend="cpp"), quantize_fp8_block(w))


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_every_e4m3_value_and_every_midpoint(backend, request):
    """All 256 codes, the midpoints between neighbours and the floats just beside each
    midpoint round the same way as the reference, from fp32 and from bf16."""
    if backend == "cpp":
        request.getfixturevalue("native")
    codes = all_codes(E4M3).float()
    finite = codes[torch.isfinite(codes)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    beside = torch.cat([torch.nextafter(mids, mids - 1), torch.nextafter(mids, mids + 1)])
    values = torch.cat([finite, mids, beside, torch.tensor([448.0, -448.0])])
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.zeros(128, 128)
        w.view(-1)[: values.numel()] = values
        w = w.to(dtype)
        _same(fp8_fast.quantize_fp8_block_fast(w, backend=backend), quantize_fp8_block(w))
    q, scale = fp8_fast.quantize_fp8_block_fast(w, backend=backend)
    assert scale.item() == 1.0  # amax 448: the codes themselves are the quantized values
    assert torch.equal(q.float().view(-1)[: finite.numel()], finite)


def _ulps_beside(x: torch.Tensor, count: int) -> torch.Tensor:
    """x and the `count` float32 values on each side of it."""
    out, lo, hi = [x], x, x
    for _ in range(count):
        lo, hi = torch.nextafter(lo, lo - 1), torch.nextafter(hi, hi + 1)
        out += [lo, hi]
    return torch.cat(out)


def test_cpp_quotients_beside_every_midpoint_with_inexact_scales(native):
    """Inputs whose quotient lands within 6 ulp of every E4M3 code and rounding midpoint,
    under 64 random inexact scales, round as the reference's division does (a kernel that
    multiplied by 1/scale without care would not: tried, and this test caught it)."""
    codes = all_codes(E4M3).float()
    finite = codes[torch.isfinite(codes) & (codes >= 0)].unique()
    targets = torch.cat([finite, (finite[1:] + finite[:-1]) / 2])
    gen = torch.Generator().manual_seed(3)
    amaxes = torch.exp(torch.empty(64).uniform_(-12, 12, generator=gen))
    tiles = []
    for amax in amaxes:
        scale = amax / 448.0
        x = _ulps_beside((targets * scale).float(), 6)
        x = torch.cat([x, -x])
        tile = torch.zeros(128 * 128)
        tile[: x.numel()] = x.clamp(-amax, amax)
        tile[-1] = amax  # the tile's amax: its scale is amax / 448
        tiles.append(tile.reshape(128, 128))
    w = torch.cat(tiles, dim=1)
    _same(fp8_fast.quantize_fp8_block_fast(w, backend="cpp"), quantize_fp8_block(w))
    # the inputs do reach the cases where the product by the reciprocal rounds differently
    scale = (amaxes / 448.0).float().repeat_interleave(128)
    quotient = w / scale
    product = w * (1.0 / scale)
    assert (quotient.to(E4M3).view(torch.uint8) != product.to(E4M3).view(torch.uint8)).any()


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_other_blocks_e5m2_and_noncontiguous(backend, request):
    if backend == "cpp":
        request.getfixturevalue("native")
    w = _weight((300, 200), torch.bfloat16, 7)
    for block in [(64, 64), (1, 128), (128, 32)]:
        _same(
            fp8_fast.quantize_fp8_block_fast(w, block, backend=backend),
            quantize_fp8_block(w, block),
        )
    _same(  # E5M2: the C++ kernel is E4M3 only, so "cpp" runs eager here
        fp8_fast.quantize_fp8_block_fast(w, dtype=E5M2, backend=backend),
        quantize_fp8_block(w, dtype=E5M2),
    )
    wt = _weight((256, 512), torch.bfloat16, 8).t()
    assert not wt.is_contiguous()
    _same(fp8_fast.quantize_fp8_block_fast(wt, backend=backend), quantize_fp8_block(wt))


def test_compiled_matches_reference():
    if not fp8_fast.compile_available():
        pytest.skip("torch.compile does not work on this machine")
    for shape in [(576, 1536), (256, 384), (1000, 130)]:
        w = _weight(shape, torch.bfloat16, 3)
        for scale_fmt in (None, "ue8m0"):
            _same(
                fp8_fast.quantize_fp8_block_fast(w, scale_fmt=scale_fmt, backend="compile"),
                quantize_fp8_block(w, scale_fmt=scale_fmt),
            )


def test_failed_build_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    """A compiler error leaves one warning line and the eager path's (exact) results."""
    broken = tmp_path / "fp8_block.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setenv("QUANTSCALE_NATIVE", "1")
    monkeypatch.setattr(fp8_fast, "_SOURCE", broken)
    monkeypatch.setattr(fp8_fast, "_native_build_dir", lambda: tmp_path / "build")
    fp8_fast._native.cache_clear()
    try:
        w = _weight((200, 300), torch.bfloat16, 5)
        with caplog.at_level(logging.WARNING, logger=fp8_fast.__name__):
            _same(fp8_fast.quantize_fp8_block_fast(w, backend="cpp"), quantize_fp8_block(w))
            _same(fp8_fast.quantize_fp8_block_fast(w, backend="cpp"), quantize_fp8_block(w))
        warnings = [r for r in caplog.records if r.name == fp8_fast.__name__]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        assert "C++ FP8 kernel unavailable" in warnings[0].getMessage()
        assert "error:" in warnings[0].getMessage() or "ninja" in warnings[0].getMessage()
        assert not fp8_fast.native_available() and not fp8_fast.native_vectorized()
    finally:
        fp8_fast._native.cache_clear()


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(fp8_fast, "native_built", lambda: False)
    monkeypatch.setattr(fp8_fast, "native_vectorized", lambda: True)
    assert fp8_fast.choose_backend(10) == "eager"  # a build would cost more than it saves
    assert fp8_fast.choose_backend(10**12) == "cpp"
    monkeypatch.setattr(fp8_fast, "native_built", lambda: True)
    assert fp8_fast.choose_backend(10) == "cpp"  # built already: loading is cheap
    monkeypatch.setattr(fp8_fast, "native_vectorized", lambda: False)
    monkeypatch.setattr(fp8_fast, "compile_available", lambda: False)
    assert fp8_fast.choose_backend(10**12) == "eager"
    monkeypatch.setattr(fp8_fast, "compile_available", lambda: True)
    assert fp8_fast.choose_backend(10**12) == "compile"
    assert fp8_fast.choose_backend(10) == "eager"
    with pytest.raises(ValueError, match="backend"):
        fp8_fast.quantize_fp8_block_fast(torch.ones(4, 4), backend="numba")


# ------------------------------------------- dequantize / convert stream like quantize does


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _bf16_scales(ckpt_dir):
    """Rewrite a compressed-tensors checkpoint with bf16 weight scales (as llm-compressor may)."""
    for shard in Checkpoint(ckpt_dir).shards:
        tensors = load_file(ckpt_dir / shard)
        for name in tensors:
            if name.endswith(".weight_scale"):
                tensors[name] = tensors[name].to(torch.bfloat16)
        save_file(tensors, ckpt_dir / shard, metadata={"format": "pt"})
    return ckpt_dir


@pytest.mark.parametrize("job", ["dequantize", "compressed-tensors", "neuron", "ct-bf16-to-hf"])
def test_dequantize_and_convert_stream_the_same_bytes(tmp_path, monkeypatch, job):
    """Both go through transform_checkpoint's planned streaming path, and write the same
    files, byte for byte, as the path that holds each output shard whole."""
    src = write_llama_like(tmp_path / "bf16", hidden=256, intermediate=384, layers=2, shards=2)
    fp8 = quantize_checkpoint_fp8(src, tmp_path / "fp8")
    if job == "ct-bf16-to-hf":
        fp8 = _bf16_scales(convert.convert_checkpoint(fp8, tmp_path / "ct", "compressed-tensors"))
    module = dequantize if job == "dequantize" else convert

    def run(out):
        if job == "dequantize":
            return dequantize.dequantize_checkpoint(fp8, out)
        return convert.convert_checkpoint(fp8, out, "hf" if job == "ct-bf16-to-hf" else job)

    real = module.transform_checkpoint
    plans = []

    def spy(*args, **kwargs):
        plans.append(kwargs.get("plan_fn"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "transform_checkpoint", spy)
    streamed = run(tmp_path / "streamed")
    assert plans and plans[0] is not None
    monkeypatch.setattr(
        module, "transform_checkpoint", lambda *a, **k: real(*a, **{**k, "plan_fn": None})
    )
    collected = run(tmp_path / "collected")
    assert _digests(streamed) == _digests(collected)
    out = Checkpoint(streamed)
    if job == "ct-bf16-to-hf":  # bf16 scales widen to float32 exactly
        scale = "model.layers.0.mlp.down_proj.weight_scale_inv"
        assert out.tensors[scale].dtype == "F32"
        ct = Checkpoint(fp8).get(scale.replace("_scale_inv", "_scale"))
        assert torch.equal(out.get(scale), ct.float())
    if job == "dequantize":
        assert not any(n.endswith("_scale_inv") for n in out.tensors)
