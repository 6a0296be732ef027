"""Fast inference: BatchNorm folded into the convolutions, channels_last, bf16/fp16, torch.compile.

A ResNet in eval mode spends almost all its time in convolutions. Folding each BatchNorm into the
convolution before it removes a pass over every activation, and channels_last lets oneDNN (CPU) and
cuDNN (GPU) run their fastest kernels; bfloat16 doubles the arithmetic rate where the hardware has
it. On the CPU in float32 the convolutions also keep their weights packed and absorb the ReLUs and
residual additions (utils/inference/fused.py); ``backend=`` hands the model to ONNX Runtime or OpenVINO instead,
or to whichever is fastest (utils/inference/backends.py). The result takes and returns float32, so it drops into
code written for the eager model.
"""
from __future__ import annotations

import itertools
import warnings

import torch
from torch import Tensor, nn

from utils.inference import backends, fused
from utils.inference.fold import fold_batchnorm
from utils.inference.hardware import check_native

DTYPES = {None: torch.float32, torch.float32: torch.float32, torch.bfloat16: torch.bfloat16,
          torch.float16: torch.float16}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the commands' --dtype
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
# What travels with the models of this repository, kept on the optimised module too.
METADATA = ("pretrained_cfg", "preprocess", "feature_info", "num_features")


def optimize_for_inference(model: nn.Module, *, backend: str = "torch", dtype: torch.dtype | None = None,
                           channels_last: bool = True, compile: bool = False) -> nn.Module:
    """An inference-only copy of ``model`` that runs faster and takes and returns what it does.

    It takes the same NCHW float32 input, of any batch size and image size from 33 pixels, and
    returns float32 outputs (logits, pooled features or the list of feature maps), with gradients off
    and the model's metadata; ``model`` itself is left unchanged. ``backend`` runs it in:

    - ``"torch"``: BatchNorm folded into the convolutions, weights in channels_last, computed in
      ``dtype`` on the model's device; ``compile=True`` also passes it through ``torch.compile``
      with weight freezing (the first call then takes seconds to compile);
    - ``"onnxruntime"`` or ``"openvino"`` (CPU, optional installs): the model's ONNX export run by
      that runtime, exported once per model and weights;
    - ``"auto"``: each input shape on whichever of these is fastest here, timed on its first batch.

    ``dtype`` is ``torch.bfloat16`` or ``torch.float16`` where the hardware computes it natively
    (a ValueError says so elsewhere), None for float32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    for name, flag in (("channels_last", channels_last), ("compile", compile)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    dtype = DTYPES[dtype]
    device = _device_of(model)
    check_native(dtype, device)
    if backend in backends.PEERS:
        if device.type != "cpu":
            raise ValueError(f"backend={backend!r} runs on the CPU here, but the model is on {device}: "
                             "use backend='torch' on a GPU")
        if compile:
            raise ValueError(f"compile=True applies to backend='torch' (or 'auto'), not {backend!r}")
        optimized = _peer(model, backend, dtype)
    elif backend == "auto":
        optimized = _auto(model, dtype, channels_last, compile, device)
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
    if compile:
        # Freezing lets inductor treat the weights as constants: it pre-packs them and fuses
        # convolution, bias, addition and ReLU into one kernel.
        with warnings.catch_warnings():  # torch's own mkldnn module, imported here, uses deprecated TorchScript
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method", category=DeprecationWarning)
            fast = torch.compile(fast, options={"freezing": True})
    elif channels_last and fused.can_fuse(fast):  # float32 on the CPU: weights packed once, ReLU and add fused
        fast = fused.FusedResNet(fast)
    return InferenceModel(fast, dtype, memory_format)


def _peer(model: nn.Module, backend: str, dtype: torch.dtype) -> backends.PeerModel:
    features = getattr(model, "feature_info", None) is not None
    return backends.PeerModel(backends.peer_runner(model, backend, dtype), backend, dtype, features)


def _auto(model: nn.Module, dtype: torch.dtype, channels_last: bool, compile: bool,
          device: torch.device) -> backends.AutoModel:
    """torch, and on the CPU each installed runtime that computes ``dtype``; one that cannot take
    this model is left out with a warning rather than failing the whole call."""
    candidates = {"torch": _torch(model, dtype, channels_last, compile)}
    for backend in backends.PEERS if device.type == "cpu" else ():
        if not backends.installed(backend) or (backend == "onnxruntime" and dtype != torch.float32):
            continue
        try:
            candidates[backend] = _peer(model, backend, dtype)
        except Exception as e:  # noqa: BLE001  (an exporter or runtime limit: the other candidates still serve)
            backends.logger.warning("backend='auto': leaving out %s, which failed: %s", backend, e)
    return backends.AutoModel(candidates)


class InferenceModel(backends.InferenceOnly):
    """Runs ``model`` in ``dtype`` and ``memory_format`` with gradients off; float32 in, float32 out."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format):
        super().__init__()
        self.model, self.dtype, self.memory_format = model, dtype, memory_format
        self.train(False)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        backends.check_float(x)
        # Not 4-D: passed on as it is, for the model's own error message (add the batch dimension...).
        x = x.to(dtype=self.dtype, memory_format=self.memory_format) if x.dim() == 4 else x.to(self.dtype)
        with torch.no_grad():
            out = self.model(x)
        out = out.float() if isinstance(out, Tensor) else [o.float() for o in out]
        return backends.keep_nonfinite(x, out)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, memory_format={self.memory_format}"


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
