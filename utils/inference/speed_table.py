"""Speed side by side: a plain eager float32 model against its ``optimize_for_inference`` variants and the
runtimes, each checked against eager's outputs, timed in the same rounds with the matrix-multiply ceiling
of the same run (``python -m utils.benchmark`` measures the twelve entries with it)."""
from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from utils.inference import runtimes
from utils.inference.compare import relative_error
from utils.inference.optimize import DTYPE_NAMES, optimize_for_inference
from utils.system.hardware import cpu_has_native
from utils.system.timing import gemm_gflops, matmul_functions, time_interleaved

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}


@dataclass
class Subject:
    """What is measured: an entry, its architecture and its top-1."""
    entry: str
    arch: str
    top1: float


@dataclass
class Row:
    entry: str
    arch: str  # entries of one architecture (ssl and swsl) are timed once and share their rows' times
    batch_size: int
    variant: str  # "eager" (the plain model), "optimized" (backend="torch"), "onnxruntime", "openvino" or "auto"
    dtype: str
    channels_last: bool
    compiled: bool
    ms_per_batch: float  # median
    spread_pct: float  # (slowest - fastest) / median, over the repeats
    images_per_second: float
    gflops: float  # from the multiply-accumulates at the size measured
    ceiling_gflops: float | None  # dense matrix multiply in the same dtype, same run; None where it is no
    ceiling_pct: float | None  # ceiling (INT8 on a CPU without 8-bit dot products)
    speedup: float  # over plain eager float32, same model and batch size
    vs_fastest_peer: float | None  # speed over the fastest of ONNX Runtime and OpenVINO in the same dtype
    # (for int8: in any float dtype measured)
    max_error: float  # largest output difference from eager float32, relative to the largest output
    top1: float  # ImageNet-1k val top-1 measured with the published weights

    @property
    def label(self) -> str:
        if self.variant == "eager":
            return "eager fp32"
        if self.variant in runtimes.NAMES:
            return f"{self.variant} {SHORT[self.dtype]}"
        return (f"{self.variant} {SHORT[self.dtype]}" + ("" if self.channels_last else " NCHW")
                + (" compiled" if self.compiled else ""))


def variants(dtypes: list[str], compile: bool, peers: list[str]) -> list[tuple[str, str, bool]]:
    """(variant, dtype, compiled) in the order they run and are reported."""
    torch_variants = [("optimized", d, c) for d in dtypes if d != "int8"  # INT8 runs in the runtimes
                      for c in ((False, True) if compile else (False,))]
    peer_variants = [(p, d, False) for d in dtypes for p in peers
                     if (runtimes.installed(p, int8=True) if d == "int8" else p != "onnxruntime" or d == "float32")]
    auto = [("auto", d, False) for d in dtypes] if peers else []
    return [("eager", "float32", False), *torch_variants, *peer_variants, *auto]


def build(eager: torch.nn.Module, variant: str, dtype: str, compiled: bool, channels_last: bool,
          img_size: int = 224) -> torch.nn.Module:
    if variant == "eager":
        return eager
    backend = "torch" if variant == "optimized" else variant
    # INT8's ranges from inputs like the timed ones (random: so are the weights), so its error is in range.
    calibration = torch.randn(16, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)) \
        if dtype == "int8" else None
    return optimize_for_inference(eager, backend=backend, dtype=DTYPE_NAMES[dtype], channels_last=channels_last,
                                  compile=compiled, calibration=calibration)


def measure(subjects: list[Subject], make_model: Callable[[str], nn.Module], batch_sizes: list[int], dtypes: list[str],
            channels_last: bool, compile: bool, device: torch.device, warmup: int, repeats: int, progress: bool = True,
            peers: list[str] = (), img_size: int = 224) -> list[Row]:
    """A row per subject, batch size and variant. ``make_model(entry)`` builds the eager model of a subject's
    architecture, once per architecture; every variant runs in the same rounds as the others and as the
    matrix multiplies that give the ceiling."""
    # The matrix multiplies run in the same rounds as the models, so that they see the same machine.
    matmuls = {f"{path} {name}": f for name in ceiling_dtypes(dtypes, device)
               for path, f in matmul_functions(device, DTYPE_NAMES[name]).items()}
    gmacs = {}
    runs = variants(dtypes, compile, list(peers))
    timed: dict[tuple[str, int], dict[tuple, list[float]]] = {}
    errors: dict[tuple[str, int], dict[tuple, float]] = {}
    archs = {s.arch: s.entry for s in reversed(subjects)}  # arch -> the first entry that has it
    bar = tqdm(total=len(archs) * len(batch_sizes) * (warmup + repeats) * (len(runs) + len(matmuls)),
               desc="benchmark", unit="batch", disable=not progress or None)
    for arch, entry in archs.items():
        if compile:
            torch.compiler.reset()  # or, after 8 models, torch.compile would quietly fall back to eager
        eager = make_model(entry).to(device)
        gmacs[arch] = count_gmacs(eager, img_size, device)
        bar.set_postfix_str(f"{entry}: preparing")
        models = {v: build(eager, *v, channels_last, img_size) for v in runs}
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, 3, img_size, img_size, device=device)
            bar.set_postfix_str(f"{entry} batch {batch_size}")
            with torch.inference_mode():
                expected = eager(x)
                # Timed calls follow: the first call of "auto" (which times its candidates) is not among them.
                errors[arch, batch_size] = {v: relative_error(m(x), expected) for v, m in models.items()}
                timed[arch, batch_size] = time_interleaved(
                    {**{v: functools.partial(m, x) for v, m in models.items()}, **matmuls},
                    warmup, repeats, device, bar.update)
        del eager, models
    bar.close()

    return [row for subject in subjects for batch_size in batch_sizes
            for row in _rows(subject, batch_size, timed[subject.arch, batch_size], errors[subject.arch, batch_size],
                             gmacs[subject.arch], runs, dtypes, device, channels_last)]


def _rows(subject: Subject, batch_size: int, times: dict, errors: dict, gmacs: float, runs: list, dtypes: list[str],
          device: torch.device, channels_last: bool) -> list[Row]:
    """One subject's rows at one batch size, from its measured times and errors."""
    ceilings = {d: max((gemm_gflops(device, statistics.median(times[f"{path} {d}"]))
                        for path in ("mm", "conv") if f"{path} {d}" in times), default=None)
                for d in ("float32", *dtypes)}
    baseline = statistics.median(times[runs[0]])
    fastest_peer = _fastest_peers(times, runs, dtypes)
    rows = []
    for variant, dtype, compiled in runs:
        seconds = statistics.median(times[variant, dtype, compiled])
        spread = max(times[variant, dtype, compiled]) - min(times[variant, dtype, compiled])
        gflops = 2 * gmacs * batch_size / seconds
        ceiling, peer = ceilings[dtype], fastest_peer.get(dtype)
        rows.append(Row(subject.entry, subject.arch, batch_size, variant, dtype,
                        channels_last and variant in ("optimized", "auto"), compiled,
                        ms_per_batch=seconds * 1e3, spread_pct=spread / seconds * 100,
                        images_per_second=batch_size / seconds, gflops=gflops,
                        ceiling_gflops=ceiling, ceiling_pct=None if ceiling is None else gflops / ceiling * 100,
                        speedup=baseline / seconds, vs_fastest_peer=None if peer is None else peer / seconds,
                        max_error=errors[variant, dtype, compiled], top1=subject.top1))
    return rows


def _fastest_peers(times: dict, runs: list, dtypes: list[str]) -> dict[str, float]:
    """The fastest runtime's median seconds per precision; INT8 rows are measured against the fastest float one."""
    peer_runs = [v for v in runs if v[0] in runtimes.NAMES]
    fastest = {d: min(statistics.median(times[v]) for v in peer_runs if v[1] == d)
               for d in dtypes if any(v[1] == d for v in peer_runs)}
    floats = [t for d, t in fastest.items() if d != "int8"]
    if "int8" in fastest and floats:
        fastest["int8"] = min(floats)
    return fastest


def ceiling_dtypes(dtypes: list[str], device: torch.device) -> list[str]:
    """The precisions whose matrix multiply is a ceiling to measure: INT8's only on a CPU with 8-bit dot
    products (VNNI), since elsewhere torch's integer GEMM runs far below what the INT8 runtimes reach."""
    return [d for d in dict.fromkeys(["float32", *dtypes])
            if d != "int8" or (device.type == "cpu" and cpu_has_native("int8"))]


def count_gmacs(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Multiply-accumulates of one ``img_size`` image in billions, counted as the registry's are (at 224)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    return counter.get_total_flops() / 2e9


def markdown(rows: list[Row]) -> str:
    """A table with one line per architecture, batch size and variant: entries that share an
    architecture share their timing."""
    lines = ["| model | batch | variant | ms/batch (spread) | images/s | GFLOP/s | % of matmul ceiling | vs eager "
             "| vs fastest peer | max. rel. error |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    entries: dict[tuple, list[str]] = {}
    for r in rows:
        entries.setdefault((r.arch, r.batch_size, r.label), []).append(f"`{r.entry}`")
    shown = set()
    for r in rows:
        key = (r.arch, r.batch_size, r.label)
        if key in shown:
            continue
        shown.add(key)
        lines.append(f"| {', '.join(entries[key])} | {r.batch_size} | {r.label} | {r.ms_per_batch:.1f} "
                     f"(±{r.spread_pct / 2:.0f}%) | {r.images_per_second:.1f} | {r.gflops:.0f} | "
                     + ("n/a" if r.ceiling_gflops is None else f"{r.ceiling_pct:.0f}% of {r.ceiling_gflops:.0f}")
                     + f" | {r.speedup:.2f}x | "
                     + ("" if r.vs_fastest_peer is None else f"{r.vs_fastest_peer:.2f}x") + f" | {r.max_error:.0e} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str, img_size: int = 224) -> None:
    """Measured top-1 against images/s at the largest batch size: a line per entry through its variants."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_size = max(r.batch_size for r in rows)
    rows = [r for r in rows if r.batch_size == batch_size]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for entry in dict.fromkeys(r.entry for r in rows):
        mine = sorted((r for r in rows if r.entry == entry), key=lambda r: r.images_per_second)
        ax.plot([r.images_per_second for r in mine], [r.top1 for r in mine], "-", color="0.8", zorder=1)
        ax.annotate(entry, (mine[0].images_per_second, mine[0].top1), fontsize=7, ha="right", va="center",
                    xytext=(-7, 0), textcoords="offset points")
    for label in dict.fromkeys(r.label for r in rows):
        mine = [r for r in rows if r.label == label]
        ax.scatter([r.images_per_second for r in mine], [r.top1 for r in mine], label=label, s=22, zorder=2)
    ax.set_xscale("log")
    low = min(r.images_per_second for r in rows)
    ax.set_xlim(low / 4, max(r.images_per_second for r in rows) * 1.3)
    ax.set_xlabel(f"images/s (batch {batch_size}, {img_size}x{img_size})")
    ax.set_ylabel("ImageNet-1k val top-1 (%), measured")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
