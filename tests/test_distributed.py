"""Data-parallel calibration on torch.distributed (gloo, 2 ranks on this CPU): the same
output as one process, tensor for tensor; observer reductions; a killed rank and a resume."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_streaming import CALIB, assert_same_checkpoint, make_checkpoint

from quantscale import distributed
from quantscale.calibration.boundary import parse_bytes
from quantscale.errors import QuantscaleError
from quantscale.observers import get_observer
from quantscale.orchestrator import GPTQOptions, quantize_checkpoint
from quantscale.scheme import QuantArgs
from quantscale.streaming import KILL_AFTER_ENV, KILL_RANK_ENV, StreamOptions

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dist"), 3)


@pytest.fixture
def one_thread():
    """The ranks run with one OMP thread each; so does the 1-process reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(root: Path, out: str, scheme: str, stream: bool) -> Path:
    calib = {**CALIB, "calib_batch_size": 2, "calib_data": root / "calib.txt"}
    where = StreamOptions(device="cpu") if stream else False
    wide = GPTQOptions(hessian_dtype="float64")  # torchrun's default sum dtype
    return quantize_checkpoint(
        root / "m", root / out, scheme, method="gptq", stream=where, gptq=wide, **calib
    )


def torchrun(
    root: Path, out: str, scheme: str, stream: bool, env: dict | None = None, flags: tuple = ()
):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    job = ["-m", "quantscale", "quantize", str(root / "m"), str(root / out), "--scheme", scheme]
    job += ["--method", "gptq", "--calib-data", str(root / "calib.txt")]
    job += ["--calib-samples", "8", "--calib-seq-len", "32", "--calib-batch-size", "2"]
    job += ["--stream", "--device", "cpu"] if stream else []
    job += list(flags)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTSCALE_PROGRESS": "0"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run(launch + job, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("scheme, stream", [("w4a16", False), ("w8a8", True)], ids=str)
def test_two_ranks_equal_one_process(tiny, one_thread, scheme, stream):
    """GPTQ Hessians summed in rank order, weights broadcast from the solving rank, minmax
    observers reduced: every tensor and the config bit for bit as one process writes them."""
    name = f"{scheme}-{'stream' if stream else 'mem'}"
    one = reference(tiny, f"one-{name}", scheme, stream)
    two = torchrun(tiny, f"two-{name}", scheme, stream)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 model.layers.0: sent" in two.stderr  # the traffic log
    assert_same_checkpoint(one, tiny / f"two-{name}")
    if stream:
        assert not (tiny / f"two-{name}.partial").exists()


def test_rotated_two_ranks_equal_one_process(tiny, one_thread):
    """Hadamard rotations fused on every rank before calibration: 2 ranks write what one
    process writes."""
    calib = {**CALIB, "calib_batch_size": 2, "calib_data": tiny / "calib.txt"}
    wide = GPTQOptions(hessian_dtype="float64")
    one = quantize_checkpoint(
        tiny / "m", tiny / "one-rot", "w4a16", method="gptq", gptq=wide, rotate="hadamard", **calib
    )
    two = torchrun(tiny, "two-rot", "w4a16", False, flags=("--rotate", "hadamard"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_checkpoint(one, tiny / "two-rot")
    assert json.loads((one / "config.json").read_text())["quantization_config"]["transform_config"]


def test_clip_search_and_mse_observer_two_ranks_equal_one_process(tiny, one_thread):
    """`--gptq-clip --weight-observer mse` under torchrun: the owner rank's clipped solve and
    its codes reach every rank; the checkpoint is the one process's bit for bit."""
    from quantscale.algorithms.gptq import CLIP_GRID

    calib = {**CALIB, "calib_batch_size": 2, "calib_data": tiny / "calib.txt"}
    options = GPTQOptions(hessian_dtype="float64", clip_search=CLIP_GRID, weight_observer="mse")
    one = quantize_checkpoint(
        tiny / "m", tiny / "one-clip", "w4a16", method="gptq", gptq=options, **calib
    )
    flags = ("--gptq-clip", "--weight-observer", "mse")
    two = torchrun(tiny, "two-clip", "w4a16", False, flags=flags)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_checkpoint(one, tiny / "two-clip")


@pytest.mark.parametrize("memory", [None, "60KB"], ids=["one-pass", "expert-passes"])
def test_moe_two_ranks_equal_one_process(tmp_path, one_thread, memory):
    """Qwen3-MoE (4 experts): expert batches and the other Linears solved on their owners,
    routed tokens summed per expert; with a tiny --gptq-memory the experts come in passes."""
    root = make_checkpoint(tmp_path, 2, moe=True)
    budget = {"memory_budget": parse_bytes(memory)} if memory else {}
    wide = GPTQOptions(hessian_dtype="float64", **budget)  # torchrun's default sum dtype
    calib = {**CALIB, "calib_batch_size": 2, "calib_data": root / "calib.txt"}
    one = quantize_checkpoint(root / "m", root / "one", "w4a16", method="gptq", gptq=wide, **calib)
    flags = ("--gptq-memory", memory) if memory else ()
    two = torchrun(root, "two", "w4a16", True, flags=flags)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_checkpoint(one, root / "two")


HELD = re.compile(r"rank (\d) GPTQ Hessians: (\d+) bytes held, (\d+) bytes of routed inputs")


def _held(stderr: str) -> dict[int, tuple[int, int]]:
    """Per rank: the most Hessian bytes held at a layer's end, routed-input bytes sent."""
    out: dict[int, tuple[int, int]] = {}
    for rank, held, sent in HELD.findall(stderr):
        before = out.get(int(rank), (0, 0))
        out[int(rank)] = (max(before[0], int(held)), before[1] + int(sent))
    return out


@pytest.mark.parametrize(
    "routed, samples, seq_len, split",
    [(True, 8, 32, True), (False, 8, 32, True), (False, 32, 64, False)],
    ids=["routed", "all-experts", "inputs-outweigh-hessians"],
)
def test_expert_parallel_two_ranks_equal_one_process(
    tmp_path, one_thread, routed, samples, seq_len, split
):
    """--expert-parallel: each expert's Hessians summed and solved on one rank from the
    routed inputs the other rank sends: the one-process checkpoint, fewer Hessian bytes per
    rank than data parallelism (all-expert calibration: the shared gate/up input stays data
    parallel, the down_proj inputs are routed). Once a rank's kept inputs of an expert
    outweigh its Hessian it sums them itself: data parallel again, same bytes and output."""
    root = make_checkpoint(tmp_path, 2, moe=True)
    wide = GPTQOptions(hessian_dtype="float64")
    calib = {**CALIB, "calib_batch_size": 2, "calib_data": root / "calib.txt"}
    calib |= {"calib_samples": samples, "calib_seq_len": seq_len}
    one = quantize_checkpoint(
        root / "m",
        root / "one",
        "w4a16",
        method="gptq",
        gptq=wide,
        calibrate_all_experts=not routed,
        **calib,
    )
    mode = ("--no-calibrate-all-experts",) if routed else ()
    mode += ("--calib-samples", str(samples), "--calib-seq-len", str(seq_len))
    ep = torchrun(root, "ep", "w4a16", True, flags=("--expert-parallel", *mode))
    assert ep.returncode == 0, ep.stderr[-3000:]
    assert_same_checkpoint(one, root / "ep")
    dp = torchrun(root, "dp", "w4a16", True, flags=mode)
    assert dp.returncode == 0, dp.stderr[-3000:]
    held_ep, held_dp = _held(ep.stderr), _held(dp.stderr)
    assert sorted(held_ep) == sorted(held_dp) == [0, 1]
    for rank in (0, 1):
        if split:
            assert held_ep[rank][0] < held_dp[rank][0], (held_ep, held_dp)
            assert held_ep[rank][1] > 0
        else:
            assert held_ep[rank] == (held_dp[rank][0], 0), (held_ep, held_dp)
        assert held_dp[rank][1] == 0


def test_killed_rank_fails_clearly_and_resumes(tiny, one_thread):
    one = reference(tiny, "one-kill", "w4a16", True)
    kill = {KILL_AFTER_ENV: "0", KILL_RANK_ENV: "1"}
    killed = torchrun(tiny, "two-kill", "w4a16", True, env=kill)
    assert killed.returncode != 0
    assert "rank        : 1" in killed.stderr or "rank: 1" in killed.stderr, killed.stderr[-3000:]
    assert "SIGKILL" in killed.stderr or "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    said = [line for line in killed.stderr.splitlines() if line.startswith("error: rank 0 of 2")]
    assert said and "model.layers." in said[0], killed.stderr[-3000:]  # where rank 0 stood
    work = tiny / "two-kill.partial"
    record = json.loads((work / "progress.json").read_text())
    assert record["done"] == 2 and record["fingerprint"]["ranks"] == 2
    assert record["rank_boundaries"][0]["name"] == "boundary-1.bin"
    assert (work / "rank-1" / "boundary-1.bin").is_file()
    assert not (tiny / "two-kill").exists()
    again = torchrun(tiny, "two-kill", "w4a16", True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not work.exists()
    assert_same_checkpoint(one, tiny / "two-kill")


# ------------------------------------------------------------------ collectives in-process


def _observers(rank: int, port: int, results: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 8, generator=gen) * (i + 1) for i in range(4)]
    mine = distributed.rank_slice(batches)
    args = QuantArgs(num_bits=8, type="int", strategy="channel")
    out = {}
    for name, kw in [("minmax", {}), ("aciq", {}), ("percentile", {"combine": "mean"})]:
        obs = get_observer(name, args=args, **kw)
        for b in mine:
            obs.update(b)
        obs.reduce()
        out[name] = (obs.count, obs.min_val, obs.max_val)
    ema = get_observer("ema", args=args)
    ema.update(mine[0])
    try:
        ema.reduce()
    except QuantscaleError as err:
        out["ema"] = str(err)
    out["owners"] = distributed.owners([5.0, 1.0, 4.0, 2.0])
    distributed.shutdown()
    results[rank] = out


def test_observer_reductions_across_two_ranks():
    """minmax reduces exactly; 'mean' observers to the count-weighted mean (one process's in
    exact arithmetic: pinned at 1e-6 relative); an EMA refuses with its reason."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_observers, args=(free_port(), results), nprocs=2, join=True)
        got = dict(results)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 8, generator=gen) * (i + 1) for i in range(4)]
    args = QuantArgs(num_bits=8, type="int", strategy="channel")
    for name, kw in [("minmax", {}), ("aciq", {}), ("percentile", {"combine": "mean"})]:
        obs = get_observer(name, args=args, **kw)
        for b in batches:
            obs.update(b)
        for rank in (0, 1):
            count, mn, mx = got[rank][name]
            assert count == 4
            if name == "minmax":
                assert torch.equal(mn, obs.min_val) and torch.equal(mx, obs.max_val)
            else:
                torch.testing.assert_close(mn, obs.min_val, rtol=1e-6, atol=0)
                torch.testing.assert_close(mx, obs.max_val, rtol=1e-6, atol=0)
    assert "cannot be merged across ranks" in got[0]["ema"]
    assert got[0]["owners"] == got[1]["owners"] == [0, 0, 1, 1]


def test_single_process_is_the_no_op():
    assert not distributed.active()
    assert distributed.rank_slice([1, 2, 3]) == [1, 2, 3]
    t = torch.ones(2)
    assert distributed.sum_to(t, 0) is t
    assert distributed.owners([3.0, 1.0]) == [0, 0]


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    from quantscale.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["inspect", "nowhere"]) == 2
    assert "under torchrun only quantize" in capsys.readouterr().err


def test_importance_two_ranks_equal_one_process(tiny, one_thread):
    """`--method rtn --importance STATS` with no STATS file yet: each rank collects its share,
    the sums are added in rank order, rank 0 writes the file: the same statistics and the
    same checkpoint as one process."""
    from safetensors.torch import load_file

    calib = {**CALIB, "calib_batch_size": 2, "calib_data": tiny / "calib.txt"}
    stats_one = tiny / "imp-one.safetensors"
    one = quantize_checkpoint(
        tiny / "m", tiny / "one-imp", "w4a16", method="rtn", importance=stats_one, **calib
    )
    stats_two = tiny / "imp-two.safetensors"
    flags = ("--method", "rtn", "--importance", str(stats_two))
    two = torchrun(tiny, "two-imp", "w4a16", False, flags=flags)
    assert two.returncode == 0, two.stderr[-3000:]
    want, got = load_file(stats_one), load_file(stats_two)
    assert sorted(want) == sorted(got) and want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert_same_checkpoint(one, tiny / "two-imp")


@pytest.mark.parametrize(
    "preset, actorder, dtype",
    [
        ("W4A16", "group", torch.float32),
        ("W4A16_ASYM", None, torch.bfloat16),
        ("NVFP4A16", None, torch.float32),
        ("MXFP4A16", None, torch.bfloat16),
        ("W8A16", "weight", torch.float32),
        ("FP8_DYNAMIC", None, torch.bfloat16),
        ("FP8_BLOCK", None, torch.float32),
    ],
)
def test_owner_sends_codes_that_decode_to_its_weight(preset, actorder, dtype):
    """The solving rank broadcasts codes (two 4-bit codes a byte) and qparams, not the
    fake-quantized weight: the other ranks decode exactly the owner's weight."""
    from quantscale.algorithms.gptq import _install_weight_state, _weight_state, gptq_quantize
    from quantscale.runtime.qlinear import QuantLinear
    from quantscale.scheme import preset_scheme

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False).to(dtype)
    owner = QuantLinear.from_linear(linear, preset_scheme(preset))
    other = QuantLinear.from_linear(linear, preset_scheme(preset))
    x = torch.randn(512, 256)
    x[:, 3] *= 30  # an outlier channel: act order moves it first
    args = owner.scheme.weights
    res = gptq_quantize(owner.weight.detach().float(), x.T @ x, args, actorder=actorder)
    owner.set_weight(res.weight.to(dtype), res.qparams, res.g_idx)
    state = dict(_weight_state("m", owner))
    assert "weight" not in state and state["weight_codes"].element_size() == 1
    bits = args.num_bits
    assert state["weight_codes"].numel() == owner.weight.numel() * bits // 8
    _install_weight_state(other, "m", {f"m.{k}": v for k, v in state.items()})
    assert other.weight.dtype == dtype
    assert torch.equal(other.weight, owner.weight)
    for key, buf in owner.named_buffers():
        assert torch.equal(dict(other.named_buffers())[key], buf), key


def test_owner_sends_the_weight_when_codes_do_not_decode_to_it():
    """A weight off its grid (set by hand) travels as it is."""
    from quantscale.algorithms.gptq import _install_weight_state, _weight_state
    from quantscale.algorithms.rtn import rtn_weight
    from quantscale.runtime.qlinear import QuantLinear
    from quantscale.scheme import preset_scheme

    linear = torch.nn.Linear(64, 16, bias=False)
    owner = QuantLinear.from_linear(linear, preset_scheme("W4A16"))
    other = QuantLinear.from_linear(linear, preset_scheme("W4A16"))
    w_hat, qp = rtn_weight(owner.weight.detach(), owner.scheme.weights)
    owner.set_weight(w_hat + 1e-3, qp)
    state = dict(_weight_state("m", owner))
    assert "weight_codes" not in state
    _install_weight_state(other, "m", {f"m.{k}": v for k, v in state.items()})
    assert torch.equal(other.weight, owner.weight)
