"""`asl profile --op asl`: the operator against its peers (copy, ReLU, 3x3 depthwise conv, the
grid_sample ASL) measured side by side in one run, reported as ratios."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ...ops import active_shift, grid_sample_shift, output_size
from ..bench import median_ms, provenance

# Targets stated as ratios against peers measured in the same run.
CPU_TARGETS = {"fwd_vs_copy": 1.5, "fwdbwd_vs_copy": 6.0, "fwd_vs_relu": 1.5, "fwdbwd_vs_dw3": 0.5}
# The CPU's shapes: the paper's Table 1 layer, the CIFAR nets' three stages at batch 128, and a
# mid-sized one; each in both memory formats at strides 1 and 2.
CPU_SHAPES = [(1, 64, 224, 224), (128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8), (8, 64, 56, 56)]
CUDA_TARGETS = {"fwd_vs_copy": 1.25, "fwdbwd_vs_copy": 3.0, "fwdbwd_graph_vs_copy": 3.0, "fwdbwd_graph_vs_dw3": 1.0,
                "fwd_vs_relu_batch1": 1.2}


@dataclass
class Case:
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    channels_last: bool = False
    stride: int = 1

    @property
    def label(self) -> str:
        n, c, h, w = self.shape
        fmt = "cl" if self.channels_last else "nchw"
        return f"{n}x{c}x{h}x{w} {str(self.dtype).replace('torch.', '')} {fmt} s{self.stride}"


def default_cases(device: str) -> list[Case]:
    if device == "cpu":
        return [Case(shape, torch.float32, cl, stride) for shape in CPU_SHAPES for cl in (False, True) for stride in (1, 2)]
    cases = []
    for shape in [(128, 64, 56, 56), (128, 256, 28, 28)]:
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                cases.append(Case(shape, dtype, cl))
    cases.append(Case((128, 64, 56, 56), torch.float32, False, 2))
    cases.append(Case((128, 64, 56, 56), torch.bfloat16, False, 2))
    cases.append(Case((1, 64, 224, 224), torch.float32))
    return cases


def _fwd_bwd(fn: Callable, *leaves: torch.Tensor) -> Callable[[], object]:
    """Forward and backward with one gradient tensor made beforehand (as in out.backward(g)), so
    that no pass of filling it is timed with the op."""
    with torch.no_grad():
        grad = torch.randn_like(fn())

    def run():
        return torch.autograd.grad(fn(), leaves, grad)

    return run


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured once as a CUDA graph (after warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_case(case: Case, device: str, threads: int, min_run_time: float) -> Iterator[dict]:
    """Yields one row per (op, pass) for the case; times in ms."""
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype).contiguous(memory_format=fmt)
    C = case.shape[1]
    shift = (torch.rand(C, 2, generator=g) * 2 - 1).to(device)  # float32 even for bf16 inputs
    w_dw = torch.randn(C, 1, 3, 3, generator=g).to(device=device, dtype=case.dtype)
    s, pad_dw = case.stride, 1
    y = torch.empty_like(x)
    xr = x.detach().clone().requires_grad_(True)
    sr = shift.detach().clone().requires_grad_(True)
    wr = w_dw.detach().clone().requires_grad_(True)

    def t(fn):
        return median_ms(fn, threads=threads, min_run_time=min_run_time)

    n, c, h, w = case.shape
    out_elems = n * c * output_size(h, s, 0) * output_size(w, s, 0)
    in_bytes = x.numel() * x.element_size()
    out_bytes = out_elems * x.element_size()
    rows = []
    with torch.no_grad():
        rows.append(("copy", "fwd", t(lambda: y.copy_(x)), 2 * in_bytes))
        rows.append(("clone", "fwd", t(lambda: x.clone()), 2 * in_bytes))  # a copy into a new tensor, as the op's
        rows.append(("relu", "fwd", t(lambda: torch.relu(x)), 2 * in_bytes))
        rows.append(("dw3", "fwd", t(lambda: F.conv2d(x, w_dw, stride=s, padding=pad_dw, groups=C)), None))
        rows.append(("grid_sample_asl", "fwd", t(lambda: grid_sample_shift(x, shift, s)), None))
        rows.append(("asl", "fwd", t(lambda: active_shift(x, shift, s)), in_bytes + out_bytes))
    rows.append(("dw3", "fwd+bwd", t(_fwd_bwd(lambda: F.conv2d(xr, wr, stride=s, padding=pad_dw, groups=C), xr, wr)), None))
    rows.append(("grid_sample_asl", "fwd+bwd", t(_fwd_bwd(lambda: grid_sample_shift(xr, sr, s), xr, sr)), None))
    rows.append(("asl", "fwd+bwd", t(_fwd_bwd(lambda: active_shift(xr, sr, s), xr, sr)), None))
    if x.is_cuda:  # the same passes replayed from a CUDA graph: GPU time without the host's launch cost
        rows.append(("dw3", "fwd+bwd graph", t(cuda_graphed(_fwd_bwd(lambda: F.conv2d(xr, wr, stride=s, padding=pad_dw, groups=C), xr, wr))), None))
        rows.append(("asl", "fwd+bwd graph", t(cuda_graphed(_fwd_bwd(lambda: active_shift(xr, sr, s), xr, sr))), None))
    for op, pas, ms, nbytes in rows:
        yield {
            "case": case.label,
            "shape": "x".join(map(str, case.shape)),
            "dtype": str(case.dtype).replace("torch.", ""),
            "memory_format": "channels_last" if case.channels_last else "nchw",
            "stride": s,
            "op": op,
            "pass": pas,
            "ms": round(ms, 5),
            "gb_per_s": round(nbytes / ms / 1e6, 1) if nbytes else None,
        }


def ratios(rows: list[dict]) -> dict[str, float]:
    """The ratios the targets are stated in, for the rows of one case."""
    ms = {(r["op"], r["pass"]): r["ms"] for r in rows}
    return {
        "fwd_vs_copy": ms[("asl", "fwd")] / ms[("copy", "fwd")],
        "fwd_vs_clone": ms[("asl", "fwd")] / ms[("clone", "fwd")],
        "fwd_vs_relu": ms[("asl", "fwd")] / ms[("relu", "fwd")],
        "fwdbwd_vs_copy": ms[("asl", "fwd+bwd")] / ms[("copy", "fwd")],
        "fwdbwd_vs_dw3": ms[("asl", "fwd+bwd")] / ms[("dw3", "fwd+bwd")],
        "fwd_vs_dw3": ms[("asl", "fwd")] / ms[("dw3", "fwd")],
        "grid_sample_speedup_fwd": ms[("grid_sample_asl", "fwd")] / ms[("asl", "fwd")],
        "grid_sample_speedup_fwdbwd": ms[("grid_sample_asl", "fwd+bwd")] / ms[("asl", "fwd+bwd")],
        **({"fwdbwd_graph_vs_copy": ms[("asl", "fwd+bwd graph")] / ms[("copy", "fwd")],
            "fwdbwd_graph_vs_dw3": ms[("asl", "fwd+bwd graph")] / ms[("dw3", "fwd+bwd graph")]}
           if ("asl", "fwd+bwd graph") in ms else {}),
    }


def run(device: str = "cpu", threads: int = 1, cases: list[Case] | None = None, min_run_time: float = 1.0,
        progress: Callable[[int, str], None] | None = None) -> list[dict]:
    """Measures every case; returns rows with the ratios of their case and provenance columns.
    progress(i, label) is called before the i-th case."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("asl profile: --device cuda was asked for but no CUDA device is visible")
    prov = provenance(device, threads if device == "cpu" else None)
    out = []
    for i, case in enumerate(cases or default_cases(device)):
        if progress:
            progress(i, case.label)
        rows = list(measure_case(case, device, threads, min_run_time))
        r = ratios(rows)
        for row in rows:
            row.update({k: round(v, 4) for k, v in r.items()})
            row.update(prov)
        out.extend(rows)
    return out


# The 1x1 convolutions that follow an active shift in AS-ResNet-w68 and -w32 (stride-1 blocks),
# batch 1: the fused shift + 1x1 against the 1x1 convolution alone on the same tensor.
FUSED_SHAPES = [(1, 68, 112, 112), (1, 68, 56, 56), (1, 136, 28, 28), (1, 272, 14, 14), (1, 544, 7, 7),
                (1, 32, 56, 56), (1, 64, 28, 28), (1, 128, 14, 14), (1, 256, 7, 7)]
FUSED_TARGET = 1.1


def fused_rows(device: str = "cpu", threads: int = 1, min_run_time: float = 1.0, shapes=FUSED_SHAPES) -> list[dict]:
    """Per shape: the 1x1 convolution alone, the active shift then the convolution, and the fused
    shift_conv1x1, all float32 without bias (ms and ratios to the convolution alone)."""
    from ...ops import shift_conv1x1

    prov = provenance(device, threads if device == "cpu" else None)
    out = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device)
        C = shape[1]
        s = (torch.rand(C, 2, generator=g) * 2 - 1).to(device)
        w = torch.randn(C, C, generator=g).to(device)
        w4 = w.view(C, C, 1, 1)
        with torch.no_grad():
            conv = median_ms(lambda: F.conv2d(x, w4), threads, min_run_time)
            comp = median_ms(lambda: F.conv2d(active_shift(x, s), w4), threads, min_run_time)
            # the weight as the inference form stores it: a transposed view, the CPU kernel's layout
            wt = w.t().contiguous().t()
            fused = median_ms(lambda: shift_conv1x1(x, s, wt), threads, min_run_time)
        out.append({"case": "x".join(map(str, shape)) + " shift+1x1", "shape": "x".join(map(str, shape)), "dtype": "float32",
                    "memory_format": "nchw", "stride": 1, "op": "shift_conv1x1", "pass": "fwd", "ms": round(fused, 5),
                    "conv1x1_ms": round(conv, 5), "shift_then_conv_ms": round(comp, 5),
                    "fused_vs_conv1x1": round(fused / conv, 4), "fused_vs_shift_then_conv": round(fused / comp, 4), **prov})
    return out
