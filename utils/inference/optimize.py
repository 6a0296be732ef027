"""Fast inference: BatchNorm folded into the convolutions, channels_last, bf16/fp16, torch.compile, INT8.

A ResNet in eval mode spends almost all its time in convolutions. Folding each BatchNorm into the
convolution before it removes a pass over every activation, and channels_last lets oneDNN (CPU) and
cuDNN (GPU) run their fastest kernels; bfloat16 doubles the arithmetic rate where the hardware has
it. On the CPU in float32 the convolutions also keep their weights packed and absorb the ReLUs and
residual additions (utils/inference/fused.py); ``backend=`` hands the model to ONNX Runtime or OpenVINO instead,
or to whichever is fastest (utils/inference/backends.py), and ``dtype="int8"`` quantizes it for them
(utils/inference/quantize.py). The result takes and returns float32, so it drops into code written
for the eager model.
"""
from __future__ import annotations

import itertools
import warnings

import torch
from torch import Tensor, nn

from utils.inference import backends, fused, quantize, runtimes
from utils.inference.fold import fold_batchnorm
from utils.inference.quantize import INT8
from utils.system.hardware import check_native, cpu_has_native

DTYPE_ARGUMENTS = {None: torch.float32, torch.float32: torch.float32, torch.bfloat16: torch.bfloat16,
                   torch.float16: torch.float16, INT8: INT8}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "int8": INT8}  # the commands' --dtype
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
# What travels with the models of this repository, kept on the optimised module too.
METADATA = ("pretrained_cfg", "preprocess", "feature_info", "num_features")


def optimize_for_inference(model: nn.Module, *, backend: str | None = None, dtype: torch.dtype | str | None = None,
                           channels_last: bool = True, compile: bool = False, calibration=None) -> nn.Module:
    """An inference-only copy of ``model`` that runs faster and takes and returns what it does.

    It takes the same NCHW float32 input, of any batch size and image size from 33 pixels, and
    returns float32 outputs (logits, pooled features or the list of feature maps), with gradients off
    and the model's metadata; ``model`` itself is left unchanged. ``backend`` runs it in:

    - ``"torch"`` (the default for float): BatchNorm folded into the convolutions, weights in
      channels_last, computed in ``dtype`` on the model's device; ``compile=True`` also passes it
      through ``torch.compile`` with weight freezing (the first call then takes seconds to compile);
    - ``"onnxruntime"`` or ``"openvino"`` (CPU, optional installs): the model's ONNX export run by
      that runtime, exported once per model and weights;
    - ``"auto"``: each input shape on whichever of these is fastest here, timed on its first batch.

    ``dtype`` is ``torch.bfloat16`` or ``torch.float16`` where the hardware computes it natively
    (a ValueError says so elsewhere), None for float32, or ``"int8"`` (CPU): the ONNX export
    quantized with ranges from ``calibration`` images (a folder, image paths, or a preprocessed
    (N, 3, H, W) tensor), once per model, weights and images. INT8 runs in the fastest INT8 runtime
    installed, or in ``backend``; ``"auto"`` races it against the float candidates (float32, and
    bfloat16 where native), so it is used only where it is faster. ``.int8_fidelity`` then gives,
    per runtime, its measured agreement with float32 on calibration images held out of calibration.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if not isinstance(dtype, (torch.dtype, str, type(None))) or dtype not in DTYPE_ARGUMENTS:
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16, torch.float16 or 'int8', got {dtype!r}")
    for name, flag in (("channels_last", channels_last), ("compile", compile)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    dtype = DTYPE_ARGUMENTS[dtype]
    if calibration is not None and dtype != INT8:
        raise ValueError("calibration= is for dtype='int8' (it sets the INT8 ranges): leave it out for "
                         f"{str(dtype).removeprefix('torch.')}")
    device = _device_of(model)
    check_native(dtype, device)
    if backend in runtimes.NAMES and device.type != "cpu":
        raise ValueError(f"backend={backend!r} runs on the CPU here, but the model is on {device}: "
                         "use backend='torch' on a GPU")
    if compile and (backend in runtimes.NAMES or (dtype == INT8 and backend != "auto")):
        raise ValueError("compile=True applies to backend='torch' (or 'auto'), not "
                         + (repr(backend) if backend else "to INT8's runtimes"))
    if dtype == INT8:
        optimized = _int8(model, backend, channels_last, compile, calibration)
    elif backend in runtimes.NAMES:
        optimized = _peer(model, backend, dtype)
    elif backend == "auto":
        optimized = backends.AutoModel(_candidates(model, dtype, channels_last, compile, device))
    else:
        optimized = _torch(model, dtype, channels_last, compile)
    for name in METADATA:
        if hasattr(model, name):
            setattr(optimized, name, getattr(model, name))
    return optimized


def _torch(model: nn.Module, dtype: torch.dtype, channels_last: bool, compile: bool) -> InferenceModel:
    fast = fold_batchnorm(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    _convert_tensors(fast, dtype, memory_format)
    if not compile and channels_last and fused.can_fuse(fast):  # float32 on the CPU: packed once, ReLU, add fused
        fast = fused.FusedResNet(fast)
    return InferenceModel(fast, dtype, memory_format, compile)


def _peer(model: nn.Module, backend: str, dtype: torch.dtype, calibration: Tensor | None = None) -> backends.PeerModel:
    features = getattr(model, "out_indices", None) is not None  # a backbone: a list of maps
    if dtype == INT8:
        runner, fidelity = backends.int8_runner(model, backend, calibration)
    else:
        runner, fidelity = backends.peer_runner(model, backend, dtype), None
    return backends.PeerModel(runner, backend, dtype, features, fidelity)


def _candidates(model: nn.Module, dtype: torch.dtype, channels_last: bool, compile: bool,
                device: torch.device, suffix: str = "") -> dict[str, nn.Module]:
    """torch, and on the CPU each installed runtime that computes ``dtype``; one that cannot take
    this model is left out with a warning rather than failing the whole call."""
    candidates = {"torch" + suffix: _torch(model, dtype, channels_last, compile)}
    for backend in runtimes.NAMES if device.type == "cpu" else ():
        if not runtimes.installed(backend) or (backend == "onnxruntime" and dtype != torch.float32):
            continue
        try:
            candidates[backend + suffix] = _peer(model, backend, dtype)
        except Exception as e:  # noqa: BLE001  (an exporter or runtime limit: the other candidates still serve)
            backends.logger.warning("backend='auto': leaving out %s, which failed: %s", backend, e)
    return candidates


def _int8(model: nn.Module, backend: str | None, channels_last: bool, compile: bool, calibration) -> nn.Module:
    """INT8 in ``backend``; for None the fastest INT8 runtime installed, for "auto" the fastest of
    those and the float candidates, each input shape timed on its first batch."""
    if backend == "torch":
        raise ValueError("dtype='int8' runs in OpenVINO or ONNX Runtime: use backend=None for the faster one "
                         "installed, 'openvino', 'onnxruntime' or 'auto' (torch's own INT8, PT2E through torchao, ran "
                         "slower than OpenVINO's and compiles for seconds per input shape: see benchmarks/README.md)")
    chosen = [backend] if backend in runtimes.NAMES else [b for b in runtimes.NAMES if runtimes.installed(b, int8=True)]
    if not chosen:
        raise ImportError("dtype='int8' needs ONNX Runtime or OpenVINO with NNCF: "
                          + " or ".join(runtimes.install(b, int8=True) for b in runtimes.NAMES))
    images = quantize.calibration_images(calibration, model)
    candidates = {f"{b} int8": _peer(model, b, INT8, images) for b in chosen}
    fidelity = {name.split()[0]: candidate.fidelity for name, candidate in candidates.items()}
    if backend == "auto":
        for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, " bfloat16")):
            if cpu_has_native(dtype):
                candidates.update(_candidates(model, dtype, channels_last, compile, torch.device("cpu"), suffix))
    optimized = next(iter(candidates.values())) if len(candidates) == 1 else backends.AutoModel(candidates)
    optimized.int8_fidelity = fidelity
    return optimized


class InferenceModel(backends.InferenceOnly):
    """Runs ``model`` in ``dtype`` and ``memory_format`` with gradients off, through ``torch.compile`` with
    ``compile``; float32 in, float32 out. Pickled, it carries ``model`` and compiles it again where it lands."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format, compile: bool = False):
        super().__init__()
        self.dtype, self.memory_format, self.compiled = dtype, memory_format, compile
        self.model = _compiled(model) if compile else model
        self.train(False)

    def __getstate__(self) -> dict:
        # torch.save cannot pickle a torch.memory_format (torch 2.13): it travels by name.
        state = {**super().__getstate__(), "memory_format": str(self.memory_format).removeprefix("torch.")}
        if self.compiled:
            state["_modules"] = {**state["_modules"], "model": self.model._orig_mod}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "memory_format": getattr(torch, state["memory_format"])})
        if self.compiled:
            self.model = _compiled(self.model)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        backends.check_float(x)
        # Not 4-D: passed on as it is, for the model's own error message (add the batch dimension...).
        x = x.to(dtype=self.dtype, memory_format=self.memory_format) if x.dim() == 4 else x.to(self.dtype)
        with torch.no_grad():
            out = self.model(x)
        out = out.float() if isinstance(out, Tensor) else [o.float() for o in out]
        return backends.keep_nonfinite(x, out)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, memory_format={self.memory_format}" + (", compiled" if self.compiled else "")


def _compiled(model: nn.Module) -> nn.Module:
    # Freezing lets inductor treat the weights as constants: it pre-packs them and fuses
    # convolution, bias, addition and ReLU into one kernel.
    with warnings.catch_warnings():  # torch's own mkldnn module, imported here, uses deprecated TorchScript
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method", category=DeprecationWarning)
        return torch.compile(model, options={"freezing": True})


def _convert_tensors(model: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
    """Give each module new tensors of its own in ``dtype`` and ``memory_format``: the optimised model
    is an independent copy. Module.to() would convert the tensors in place, and they may still be
    shared with the original model."""
    def convert(t: Tensor) -> Tensor:
        t = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
        return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t

    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            setattr(module, name, nn.Parameter(convert(param.detach()), requires_grad=False))
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, convert(buffer))


def _device_of(model: nn.Module) -> torch.device:
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devices) != 1:
        raise ValueError(f"the model's tensors should be on one device, found {sorted(map(str, devices)) or 'none'}")
    device = devices.pop()
    if device.type == "meta":
        raise ValueError("the model's weights are on the meta device (not loaded): load them first")
    return device
