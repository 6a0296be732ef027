"""What model.set_grad_checkpointing() saves in training memory, and what it costs in time.

    python benchmarks/grad_checkpointing.py [--model resnet50_swsl] [--batch-size 32] [--steps 2]
                                            [--large resnext101_32x16d_swsl --large-batches 2 4]

Each configuration runs in a fresh process: a few training steps (forward, backward, SGD step) of the
model in train mode on random 224x224 images, on the CPU. The peak is the process's own peak resident
memory (VmHWM) during the steps, less what it held before them (the model, its gradients and the
optimizer are there already); the time is the median step. For ``--large``, the memory per image is
read off two batch sizes, with and without checkpointing, and gives the largest batch that fits in
the memory the plain run needs at the larger one. Prints a Markdown table; CPU named in the header.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STEP = """
import json, sys, time, torch
from models import create_model

entry, batch, steps, checkpointing = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

torch.manual_seed(0)
model = create_model(entry, pretrained=False).train()
model.set_grad_checkpointing(checkpointing)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
for p in model.parameters():  # the gradients and the optimizer's state exist before the peak is reset
    p.grad = torch.zeros_like(p)
optimizer.step()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start, times = peak_kib(), []
for _ in range(steps):
    began = time.perf_counter()
    optimizer.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    times.append(time.perf_counter() - began)
print(json.dumps({"peak_mib": (peak_kib() - start) / 1024, "seconds": times}))
"""


def run(entry: str, batch: int, steps: int, checkpointing: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, entry, str(batch), str(steps), str(int(checkpointing))],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50_swsl")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--large", default="resnext101_32x16d_swsl")
    parser.add_argument("--large-batches", nargs=2, type=int, default=[2, 4])
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from utils.system.hardware import describe_cpu

    print(f"{describe_cpu()}; training steps at 224x224 on the CPU, each configuration in a fresh process\n")
    print("| model | batch | gradient checkpointing | peak memory of a step (MiB) | s a step (median) |")
    print("|---|---:|---|---:|---:|")
    results = {}
    for checkpointing in (False, True):
        r = results[checkpointing] = run(args.model, args.batch_size, args.steps, checkpointing)
        print(f"| {args.model} | {args.batch_size} | {'on' if checkpointing else 'off'} | {r['peak_mib']:.0f} | "
              f"{statistics.median(r['seconds']):.2f} |", flush=True)
    off, on = results[False], results[True]
    print(f"\n{args.model}, batch {args.batch_size}: {100 * (1 - on['peak_mib'] / off['peak_mib']):.0f}% less memory, "
          f"{statistics.median(on['seconds']) / statistics.median(off['seconds']):.2f}x the time a step\n")
    if args.large:
        small, big = args.large_batches
        per_image, base = {}, {}
        for checkpointing in (False, True):
            low, high = (run(args.large, b, 1, checkpointing)["peak_mib"] for b in (small, big))
            per_image[checkpointing] = (high - low) / (big - small)
            base[checkpointing] = low - per_image[checkpointing] * small
            print(f"{args.large}, checkpointing {'on' if checkpointing else 'off'}: {low:.0f} MiB at batch {small}, "
                  f"{high:.0f} at batch {big}: {per_image[checkpointing]:.0f} MiB an image", flush=True)
        budget = base[False] + per_image[False] * big
        fits = int((budget - base[True]) // per_image[True])
        print(f"\nIn the {budget:.0f} MiB that {args.large} needs at batch {big} without checkpointing, it "
              f"trains batches of {fits} with it ({fits / big:.1f}x).")


if __name__ == "__main__":
    main()
