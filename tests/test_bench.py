"""core.bench's harness on tiny models, without timing anything real: renaming and copying weights into a
reference, what `measure` times, counts and reads as peak memory (a fake clock; fake CUDA calls), that
`run_isolated` measures in a fresh process, and which round `compare` keeps, its ratios' direction (ours over
the reference) and the table it prints. (The recipes' benchmarks run in their own tests.)"""

import json
import os
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch

from core import bench

MARK = []  # set by the test process only: a fresh interpreter sees it empty
ALLOCATED = 96 * 2**20  # bytes that `allocating_build`'s step holds


def allocating_build(impl: str, args):
    """A build that holds ALLOCATED bytes (touched, so resident) and writes down where it ran."""
    with open(args.record, "w") as f:
        json.dump({"pid": os.getpid(), "marked": bool(MARK), "impl": impl}, f)
    held = torch.ones(ALLOCATED // 4)
    return lambda: held.sum()


def test_rename_replaces_every_occurrence_of_each_part_in_turn():
    assert bench.rename("blocks.0.blocks", [("blocks", "layers")]) == "layers.0.layers"
    assert bench.rename("a.weight", [("a.", "b."), ("b.", "c.")]) == "c.weight"  # the second sees the first's output


class Ours(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        self.extra = torch.nn.Parameter(torch.ones(5))  # ours only


class Reference(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.proj, self.norm = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.LayerNorm(2)


def reference_name(name: str) -> str:
    return bench.rename(name, [("encoder", "backbone"), ("head", "proj")])


def test_copy_renamed_copies_each_weight_to_its_renamed_counterpart_and_names_those_left_without_one():
    ours, reference = Ours(), Reference()
    bench.copy_renamed(ours, reference, reference_name, skip={"extra"}, unmatched={"norm.weight", "norm.bias"})
    ref = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        if name != "extra":
            assert torch.equal(ref[reference_name(name)], p), name
            assert ref[reference_name(name)].requires_grad  # still a trainable leaf
    with pytest.raises(RuntimeError, match=r"without a counterpart: \['norm.bias', 'norm.weight'\]"):
        bench.copy_renamed(Ours(), Reference(), reference_name, skip={"extra"})


def test_copy_renamed_refuses_a_mapping_that_copy_would_broadcast_repeat_or_miss():
    """`copy_` broadcasts, and a second source would overwrite the first: a wrong mapping must not pass."""
    narrow, wide = torch.nn.Linear(4, 1), torch.nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match=r"'weight' \(1, 4\) maps to the reference's 'weight' \(3, 4\)"):
        bench.copy_renamed(narrow, wide, lambda n: n)
    two = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.ones(2))})
    one = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.zeros(2))})
    with pytest.raises(RuntimeError, match="'b' and 'a' both map to the reference's 'a'"):
        bench.copy_renamed(two, one, lambda n: "a")
    with pytest.raises(RuntimeError, match="'b' maps to the reference's 'c', which it does not have"):
        bench.copy_renamed(two, one, lambda n: {"a": "a", "b": "c"}[n])


def test_reference_step_starts_the_reference_from_our_weights():
    ours, reference = torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 2))
    args = Namespace(device="cpu", precision="32-true")
    x = torch.randn(2, 3)
    step = bench.reference_step(
        reference, ours, lambda name: f"0.{name}", lambda m: m(x).sum(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), args
    )
    assert torch.equal(reference[0].weight, ours.weight) and torch.equal(reference[0].bias, ours.bias)
    step()
    assert not torch.equal(reference[0].weight, ours.weight)  # the step trains the reference


def test_training_step_zeroes_gradients_and_runs_its_hooks_around_the_update():
    """Each step's update is its own gradient (not summed over steps); `before_step` sees it before the
    optimizer does (gradient clipping); `after` sees the updated weights (an EMA)."""
    args = Namespace(device="cpu", precision="32-true")
    w = torch.nn.Parameter(torch.zeros(2))
    seen = []
    step = bench.training_step(lambda: w.sum(), torch.optim.SGD([w], lr=1.0), args, after=lambda: seen.append(w.tolist()))
    step()
    step()
    assert w.tolist() == [-2.0, -2.0] and seen == [[-1.0, -1.0], [-2.0, -2.0]]
    v = torch.nn.Parameter(torch.zeros(2))
    step = bench.training_step(lambda: v.sum(), torch.optim.SGD([v], lr=1.0), args, before_step=lambda: v.grad.mul_(0.5))
    step()
    assert v.tolist() == [-0.5, -0.5]


def test_training_step_autocasts_only_under_bf16_mixed():
    x, w = torch.randn(2, 3), torch.nn.Parameter(torch.randn(3, 2))
    for precision, dtype in (("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)):
        dtypes = []

        def loss():
            y = x @ w
            dtypes.append(y.dtype)
            return y.float().sum()

        bench.training_step(loss, torch.optim.SGD([w], lr=0.1), Namespace(device="cpu", precision=precision))()
        assert dtypes == [dtype], precision


def fake_measure(monkeypatch, device: str, events: list):
    """measure(build, "ours", args) with a clock that moves 1 s a step, on `device`; `events` gets the calls
    made, in order."""
    clock = [0.0]
    x, w = torch.randn(4, 8), torch.randn(8, 16)  # 2 * 4 * 8 * 16 = 1024 FLOPs a step

    def step():
        events.append("step")
        clock[0] += 1.0
        x @ w

    def build(impl, args):
        events.append(f"build {impl}")
        events.append(torch.rand(1).item())  # the seed each implementation starts from
        return step

    def perf_counter():
        events.append("clock")
        return clock[0]

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=perf_counter))
    args = Namespace(device=device, warmup=2, steps=3)
    return bench.measure(build, "ours", args)


def test_measure_times_the_steps_after_the_warmup_and_counts_one_steps_flops(monkeypatch):
    events = []
    result = fake_measure(monkeypatch, "cpu", events)
    torch.manual_seed(0)
    seed = torch.rand(1).item()
    assert events == ["build ours", seed, *["step"] * 3, "clock", *["step"] * 3, "clock"]  # 1 counted + 2 warmup, 3 timed
    assert result["impl"] == "ours" and result["seconds_per_step"] == 1.0 and result["flops_per_step"] == 1024


def test_measure_on_cuda_resets_the_peak_first_and_synchronises_around_the_timed_steps(monkeypatch):
    """The CUDA calls faked: kernels run asynchronously, so the clock is read only after a synchronize."""
    events = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: events.append(f"reset {device}"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: events.append("peak") or 12345)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1)
    result = fake_measure(monkeypatch, "cuda", events)
    timed = [*["step"] * 3, "sync", "clock"]
    assert [e for e in events if isinstance(e, str)] == ["reset cuda", "build ours", *["step"] * 3, "sync", "clock", *timed, "peak"]
    assert result["peak_memory_bytes"] == 12345 and result["seconds_per_step"] == 1.0


def test_run_isolated_measures_in_a_fresh_process_the_rise_of_its_peak_memory(tmp_path):
    """A fresh interpreter (not a fork of this one, which holds MARK), and the peak resident memory's rise over
    what the process held before building: about the ALLOCATED bytes the step holds, not the process's whole
    footprint (torch alone is hundreds of MB)."""
    MARK.append(1)
    args = Namespace(device="cpu", warmup=0, steps=1, record=str(tmp_path / "record.json"))
    result = bench.run_isolated(allocating_build, "reference", args)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record == {"pid": record["pid"], "marked": False, "impl": "reference"} and record["pid"] != os.getpid()
    assert result["impl"] == "reference"
    assert ALLOCATED <= result["peak_memory_bytes"] < ALLOCATED + 64 * 2**20, result["peak_memory_bytes"]


def idle_build(impl: str, args):
    return lambda: None


def test_run_isolated_never_reads_a_negative_rise_for_a_step_that_holds_nothing(tmp_path):
    """The baseline and the peak come from one source (ru_maxrss lagged /proc/self/statm: -0.2 MB read
    here for a step that allocates nothing), and the peak is reset first, so the imports' is not counted."""
    args = Namespace(device="cpu", warmup=0, steps=1)
    rises = [bench.run_isolated(idle_build, "ours", args)["peak_memory_bytes"] for _ in range(2)]
    assert all(0 <= rise < 8 * 2**20 for rise in rises), rises


def test_a_reference_whose_memory_did_not_rise_gives_no_memory_ratio(monkeypatch):
    calls = []

    def run_isolated(build, impl, args):
        calls.append(impl)
        return {"impl": impl, "seconds_per_step": 1.0, "flops_per_step": 1e9, "peak_memory_bytes": 0 if impl == "reference" else 4096}

    monkeypatch.setattr(bench, "run_isolated", run_isolated)
    report = bench.compare(None, setup(rounds=1))
    assert report["ours_over_reference"]["memory"] is None
    assert "ours / reference: time 1.00x, memory -, FLOPs 1.00x" in bench.table(report, "t")


def fake_rounds(monkeypatch):
    """run_isolated faked: each implementation's seconds a step by round, its FLOPs and peak memory; the calls."""
    seconds = {"reference": [3.0, 2.0, 4.0], "ours": [1.5, 2.5, 1.0]}
    flops, memory = {"reference": 4e12, "ours": 3e12}, {"reference": 8e9, "ours": 2e9}
    calls = []

    def run_isolated(build, impl, args):
        calls.append(impl)
        n = calls.count(impl) - 1
        return {"impl": impl, "seconds_per_step": seconds[impl][n], "flops_per_step": flops[impl], "peak_memory_bytes": memory[impl], "round": n}

    monkeypatch.setattr(bench, "run_isolated", run_isolated)
    return calls


def setup(**changes) -> Namespace:
    return Namespace(**{"batch": 8, "steps": 5, "warmup": 2, "rounds": 3, "device": "cpu", "precision": "32-true", "peak_tflops": 4.0, **changes})


def test_compare_alternates_rounds_keeps_each_best_and_gives_ours_over_the_reference(monkeypatch):
    calls = fake_rounds(monkeypatch)
    args = setup()
    report = bench.compare(None, args)
    assert calls == ["reference", "ours"] * 3
    ref, ours = report["reference"], report["ours"]
    assert (ref["round"], ours["round"]) == (1, 2)  # the fastest of each
    assert ref["rounds_seconds_per_step"] == [3.0, 2.0, 4.0] and ours["rounds_seconds_per_step"] == [1.5, 2.5, 1.0]
    assert (ref["samples_per_second"], ours["samples_per_second"]) == (4.0, 8.0)
    assert (ref["tflops"], ours["tflops"]) == (2.0, 3.0) and (ref["mfu"], ours["mfu"]) == (0.5, 0.75)
    assert report["ours_over_reference"] == {"time": 0.5, "memory": 0.25, "flops": 0.75}
    assert report["setup"] == vars(args)
    fake_rounds(monkeypatch)
    assert bench.compare(None, setup(peak_tflops=None))["ours"]["mfu"] is None


def test_table_shows_each_best_round_and_the_ratios_ours_over_the_reference(monkeypatch):
    fake_rounds(monkeypatch)
    assert bench.table(bench.compare(None, setup(device="cuda:1")), "Tiny") == "\n".join([
        "Tiny, batch 8, 32-true, cuda:1; best of 3 rounds of 5 steps",
        "| model | s/step | samples/s | GFLOP/step | TFLOP/s | MFU | peak CUDA memory (GB) |",
        "|---|---|---|---|---|---|---|",
        "| reference | 2.000 | 4.0 | 4000.0 | 2.00 | 50.0% | 8.00 |",
        "| ours | 1.000 | 8.0 | 3000.0 | 3.00 | 75.0% | 2.00 |",
        "s/step by round: reference 3.000, 2.000, 4.000; ours 1.500, 2.500, 1.000",
        "ours / reference: time 0.50x, memory 0.25x, FLOPs 0.75x",
    ])  # fmt: skip
    fake_rounds(monkeypatch)
    lines = bench.table(bench.compare(None, setup(peak_tflops=None)), "Tiny").splitlines()
    assert "| peak RSS rise (GB) |" in lines[1] and lines[4] == "| ours | 1.000 | 8.0 | 3000.0 | 3.00 | - | 2.00 |"
