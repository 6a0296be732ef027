"""ONNX Runtime and OpenVINO behind the model's own interface, and "auto", which picks the fastest.

Both runtimes read the model's ONNX export (``utils.inference.export.onnx_program``). The export takes seconds,
so it is made once per model and weights and kept while the model lives: a second
``optimize_for_inference`` of the same model reuses it, and its runtime sessions too. The weights are
recognised by their content (a hash of every tensor's bytes), so any change to them (an optimizer
step, ``load_state_dict``, an edit through ``.data``) makes the next call export afresh. INT8 models
(quantize.py) are kept with the export, one per runtime and calibration images, with their measured
fidelity.

Every backend answers a non-finite input as eager PyTorch would: the outputs of an image with a NaN
or an infinity are NaN (fused ReLUs and some runtimes would otherwise turn them into finite numbers).

An optimised model crosses into another process (pickling, ``torch.save``, spawned workers) as what its
runtime was made from: the ONNX bytes, or the INT8 model, and the new process builds the runtime anew.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from utils.images.tensors import check_input
from utils.inference import quantize, runtimes
from utils.inference.fold import fold_batchnorm
from utils.pickling import Portable
from utils.system.hardware import check_native, cpu_has_native

logger = logging.getLogger("semi_supervised_hub")

OPENVINO_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
RACED_SHAPES = 64  # "auto" remembers its choice for this many input shapes, then goes by the most frequent


@dataclass
class _Exported:
    fingerprint: tuple
    onnx: bytes
    runners: dict = field(default_factory=dict)  # (backend, dtype, threads, calibration digest) -> runner
    quantized: dict = field(default_factory=dict)  # (backend, calibration digest) -> (INT8 model, Fidelity)


_EXPORTS: weakref.WeakKeyDictionary[nn.Module, _Exported] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """The model's tensors by name, shape, type and a hash of their bytes: changes whenever a value does,
    however it was changed (the version counter misses edits through ``.data``)."""
    digest = hashlib.blake2b(digest_size=16)
    layout = []
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
        layout.append((name, tuple(t.shape), t.dtype))
    return tuple(layout), digest.hexdigest()


def _exported(model: nn.Module) -> _Exported:
    fingerprint = _fingerprint(model)
    cached = _EXPORTS.get(model)
    if cached is None or cached.fingerprint != fingerprint:
        from utils.inference.export import onnx_program  # on first use: onnx and onnxscript are optional

        start = time.perf_counter()
        program = onnx_program(fold_batchnorm(model))  # folded: fewer nodes, the model untouched
        cached = _Exported(fingerprint, program.model_proto.SerializeToString())
        _EXPORTS[model] = cached
        logger.info("exported %s to ONNX in %.1f s", type(model).__name__, time.perf_counter() - start)
    return cached


def onnxruntime_runner(onnx: bytes, dtype: torch.dtype, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Idle threads sleep instead of spinning, so they leave the cores to torch and DataLoader workers.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {name: x})

    run.source = onnx  # what the session was made from: what a pickled model carries
    return run


def openvino_runner(model: bytes | tuple[bytes, bytes], dtype: torch.dtype,
                    threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``model``: ONNX bytes, or the IR (XML, weights) that INT8 quantization makes of them."""
    core = runtimes.openvino_core()
    # The precision is set explicitly: OpenVINO otherwise computes in bf16 wherever the CPU has it.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
              "INFERENCE_PRECISION_HINT": openvino_precision(dtype)}
    compiled = core.compile_model(core.read_model(*model) if isinstance(model, tuple) else core.read_model(model),
                                  "CPU", config)
    idle: queue.SimpleQueue = queue.SimpleQueue()  # one request per concurrent caller, reused

    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:  # share_outputs=False: the arrays are copies that the next call cannot overwrite
            return list(request.infer({0: x}, share_inputs=True, share_outputs=False).to_tuple())
        finally:
            idle.put(request)

    run.config, run.compiled = config, compiled  # what was asked of OpenVINO, and what it compiled
    run.source = model
    return run


def openvino_precision(dtype: torch.dtype) -> str:
    """OpenVINO's precision for ``dtype``; for INT8, that of the layers left in float (the grouped
    convolutions, pooling, the head): bfloat16 where the CPU computes it natively, which made INT8
    ResNeXt-50 1.2x faster on an AVX-512 bf16 CPU, float32 elsewhere."""
    if dtype == quantize.INT8:
        return "bf16" if cpu_has_native(torch.bfloat16) else "f32"
    return OPENVINO_PRECISION[dtype]


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


def peer_runner(model: nn.Module, backend: str, dtype: torch.dtype) -> Callable[[np.ndarray], list[np.ndarray]]:
    """A function running ``model`` through ``backend``: a float32 NCHW array in, the output arrays out."""
    runtimes.require(backend)
    exported = _checked_export(model, backend, dtype)
    key = (backend, dtype, torch.get_num_threads(), None)
    if key not in exported.runners:
        exported.runners[key] = RUNNERS[backend](exported.onnx, dtype, torch.get_num_threads())
    return exported.runners[key]


def int8_runner(model: nn.Module, backend: str,
                calibration: Tensor) -> tuple[Callable[[np.ndarray], list[np.ndarray]], quantize.Fidelity]:
    """``peer_runner`` for INT8, quantized with ranges from ``calibration`` (preprocessed images) once per
    weights and images, and its fidelity, measured on the images held out of calibration."""
    runtimes.require(backend, int8=True)
    exported = _checked_export(model, backend, quantize.INT8)
    digest, threads = quantize.digest(calibration), torch.get_num_threads()
    key = (backend, quantize.INT8, threads, digest)
    if (backend, digest) not in exported.quantized:
        start = time.perf_counter()
        images, held_out = quantize.split(calibration)
        quantized = quantize.quantize(exported.onnx, backend, images)
        exported.runners[key] = RUNNERS[backend](quantized, quantize.INT8, threads)
        check = images if held_out is None else held_out
        got = [torch.from_numpy(y) for y in exported.runners[key](np.ascontiguousarray(check.numpy()))]
        with torch.no_grad():
            expected = fold_batchnorm(model)(check)
        fidelity = quantize.fidelity(expected, got if isinstance(expected, list) else got[0], held_out is not None)
        exported.quantized[backend, digest] = quantized, fidelity
        logger.info("quantized %s to INT8 for %s in %.1f s: %s", type(model).__name__, backend,
                    time.perf_counter() - start, fidelity)
    quantized, fidelity = exported.quantized[backend, digest]
    if key not in exported.runners:  # quantized before, with another number of threads
        exported.runners[key] = RUNNERS[backend](quantized, quantize.INT8, threads)
    return exported.runners[key], fidelity


def _checked_export(model: nn.Module, backend: str, dtype: torch.dtype) -> _Exported:
    if backend == "onnxruntime" and dtype not in (torch.float32, quantize.INT8):  # before the export, not after it
        raise ValueError("backend='onnxruntime' runs these models in float32 or int8 on the CPU: use dtype=None, "
                         "or backend='openvino' or 'torch' for a 16-bit precision")
    check_native(dtype, torch.device("cpu"))
    stored = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if stored != {torch.float32}:
        raise ValueError(f"backend={backend!r} exports the model from float32, but its weights are "
                         f"{', '.join(sorted(map(str, stored)))}: use model.float(), and dtype= for the precision")
    return _exported(model)


def check_float(x) -> None:
    """The optimised models take any float tensor: name the remedy for anything else."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("expected a float tensor of preprocessed images (N, 3, H, W), got "
                        + (f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__)
                        + ": use model.preprocess(image) to make one")


def keep_nonfinite(x: Tensor, out: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    """``out`` with NaN in every output of an image of ``x`` that holds a NaN or an infinity."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1) if x.dim() > 1 else None
    if bad is None or not bad.any():
        return out
    for o in [out] if isinstance(out, Tensor) else out:
        o[bad.to(o.device)] = float("nan")
    return out


class InferenceOnly(nn.Module, metaclass=Portable):
    """Refuses .train(): the BatchNorm layers are folded away, or the model lives in another runtime."""

    def train(self, mode: bool = True) -> InferenceOnly:
        if mode:
            raise RuntimeError("an optimised model is for inference only (its BatchNorm layers are folded away): "
                               "train or fine-tune the original model, then optimise it again")
        return super().train(False)


_CPU_FLOAT32 = torch.empty(0)


class PeerModel(InferenceOnly):
    """Runs the model in ONNX Runtime or OpenVINO on the CPU: float32 NCHW tensor in, float32 out."""

    def __init__(self, runner: Callable[[np.ndarray], list[np.ndarray]], backend: str, dtype: torch.dtype,
                 features: bool, fidelity: quantize.Fidelity | None = None):
        super().__init__()
        self.runner, self.backend, self.dtype, self.features = runner, backend, dtype, features
        self.fidelity = fidelity  # INT8 only: how far it departs from float32, measured
        self.train(False)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        check_float(x)
        if x.device.type != "cpu":
            raise TypeError(f"backend={self.backend!r} runs on the CPU, but the input is on {x.device}: use x.cpu()")
        x = x.detach().to(torch.float32)
        check_input(x, _CPU_FLOAT32)
        if len(x) == 0:  # a runtime may refuse an empty batch: answer for one image, and keep none of it
            return [o[:0] for o in self(torch.zeros(1, *x.shape[1:]))] if self.features else self(x.new_zeros(
                1, *x.shape[1:]))[:0]
        outputs = [torch.from_numpy(y) for y in self.runner(np.ascontiguousarray(x.numpy()))]
        return keep_nonfinite(x, outputs if self.features else outputs[0])

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, dtype={self.dtype}"

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["runner"] = self.runner.source
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.runner = RUNNERS[self.backend](self.runner, self.dtype, torch.get_num_threads())


class AutoModel(InferenceOnly):
    """Runs each input shape on the fastest of several equivalent models, timed on its first call.

    The first batch of each shape (N, H, W) runs through every candidate once to warm it up, then
    again round-robin, so that the machine's ups and downs fall on all alike: at least three rounds,
    and up to eight while the best run of the leader is not 3% ahead of the runner-up's (closer than
    that, either choice is as good). Later batches of that shape go straight to the winner;
    ``choices`` shows which won where.
    """

    ROUNDS = (3, 8)  # fewest, most
    MARGIN = 0.03

    def __init__(self, candidates: dict[str, nn.Module]):
        super().__init__()
        self.candidates = nn.ModuleDict(candidates)
        self.choices: dict[tuple[int, ...], str] = {}
        self.train(False)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if len(self.candidates) == 1:  # nothing to choose from: no runtime is installed
            return next(iter(self.candidates.values()))(x)
        shape = (x.shape[0], *x.shape[2:]) if isinstance(x, Tensor) and x.dim() == 4 else None
        if shape in self.choices:
            return self.candidates[self.choices[shape]](x)
        if shape is None or len(self.choices) >= RACED_SHAPES:
            frequent = Counter(self.choices.values()).most_common(1)
            return self.candidates[frequent[0][0] if frequent else next(iter(self.candidates))](x)
        for candidate in self.candidates.values():
            candidate(x)  # a bad input fails here, in the first candidate, with its own error
        times: dict[str, float] = {}
        outputs: dict[str, Tensor | list[Tensor]] = {}
        for round_ in range(1, self.ROUNDS[1] + 1):
            for name, candidate in self.candidates.items():
                start = time.perf_counter()
                outputs[name] = candidate(x)
                times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
            best, *others = sorted(times.values())
            if round_ >= self.ROUNDS[0] and (not others or others[0] >= best * (1 + self.MARGIN)):
                break
        self.choices[shape] = min(times, key=times.get)
        logger.info("backend='auto' for input %s: %s (%s)", tuple(x.shape), self.choices[shape],
                    ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))
        return outputs[self.choices[shape]]

    def extra_repr(self) -> str:
        return f"choices={self.choices}"

