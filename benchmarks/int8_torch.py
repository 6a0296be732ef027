"""torch's own INT8 (PT2E through torchao, compiled by inductor) against the INT8 the repository uses.

    python benchmarks/int8_torch.py [--model resnet50_swsl] [--batch-sizes 1 16]   # pip install torchao

PT2E's X86InductorQuantizer refuses a block that calls one ReLU module three times, as these blocks
do (torchvision's too): "Input partition has more than one output node". This script quantizes a
copy whose blocks call a ReLU module each (the same state dict and bit-identical outputs, checked),
compiles it with inductor's global freezing setting (``torch.compile(options={"freezing": True})``
fails: onednn.qconv_prepack has no meta kernel), and times it round-robin against OpenVINO and
ONNX Runtime INT8 and the fastest float paths, all calibrated on the same random inputs. Prints a
Markdown table; CPU named in the header.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from models.resnet import BasicBlock, Bottleneck  # noqa: E402
from utils.inference.compare import relative_error  # noqa: E402
from utils.inference.optimize import optimize_for_inference  # noqa: E402
from utils.system.timing import describe_machine, time_interleaved  # noqa: E402


def bottleneck_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.relu2(self.bn2(self.conv2(out)))
    return self.relu3(self.bn3(self.conv3(out)) + identity)


def basic_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu1(self.bn1(self.conv1(x)))
    return self.relu3(self.bn2(self.conv2(out)) + identity)


def per_call_relus(model: nn.Module) -> nn.Module:
    """A copy whose blocks call a ReLU module each: what PT2E's partitioner needs."""
    copied = copy.deepcopy(model)
    for block in copied.modules():
        if isinstance(block, (Bottleneck, BasicBlock)):
            block.relu1, block.relu2, block.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
            forward = bottleneck_forward if isinstance(block, Bottleneck) else basic_forward
            block.forward = types.MethodType(forward, block)
    return copied


def pt2e_int8(model: nn.Module, calibration: torch.Tensor):
    import torch._inductor.config as inductor
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    free = {"x": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    prepared = prepare_pt2e(torch.export.export(model, (calibration[:2],), dynamic_shapes=free).module(), quantizer)
    with torch.no_grad():
        for image in calibration.split(1):
            prepared(image)
    compiled = torch.compile(convert_pt2e(prepared))

    def run(x):
        with torch.no_grad(), inductor.patch(freezing=True):
            return compiled(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50_swsl")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, pretrained=False).eval()
    calibration = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    split = per_call_relus(model)
    with torch.no_grad():
        assert torch.equal(split(calibration[:2]), model(calibration[:2])), "the per-call ReLU copy differs"
    assert split.state_dict().keys() == model.state_dict().keys()
    candidates = {"torch PT2E int8 (compiled)": pt2e_int8(split, calibration)}
    for name, backend, dtype in (("OpenVINO int8", "openvino", "int8"),
                                 ("ONNX Runtime int8", "onnxruntime", "int8"),
                                 ("OpenVINO bf16", "openvino", torch.bfloat16),
                                 ("torch bf16", "torch", torch.bfloat16)):
        candidates[name] = optimize_for_inference(model, backend=backend, dtype=dtype,
                                                  calibration=calibration if dtype == "int8" else None)
    print(f"{describe_machine(torch.device('cpu'))}; {args.model}, random weights, median of {args.repeats} rounds\n")
    print("| batch | " + " | ".join(candidates) + " |\n|---:|" + "---:|" * len(candidates))
    for batch_size in args.batch_sizes:
        x = torch.randn(batch_size, 3, 224, 224)
        with torch.no_grad():
            expected = model(x)
        start = time.perf_counter()
        errors = {name: relative_error(run(x), expected) for name, run in candidates.items()}  # and compiles
        print(f"(batch {batch_size}: first calls, PT2E compiling, {time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
        times = time_interleaved({name: functools.partial(run, x) for name, run in candidates.items()}, 2,
                                 args.repeats, torch.device("cpu"))
        print(f"| {batch_size} | " + " | ".join(f"{statistics.median(times[n]) * 1e3:.1f} ms ({errors[n]:.0e})"
                                                 for n in candidates) + " |", flush=True)


if __name__ == "__main__":
    main()
