"""Whole-process time and peak memory of loading a pretrained model, against a bare load of the file.

    python benchmarks/load.py [--entry resnext101_32x16d_swsl] [--repeats 5] [--safetensors]

A random checkpoint of the entry's architecture is written in the published (legacy) format to the
entry's place in a temporary torch.hub cache, recorded as verified, so the cache is warm and nothing
is downloaded or hashed. Then,
alternating so that they share the machine's state, each command runs in a fresh process:

  bare      python -c "import torch; torch.load(FILE, weights_only=True)"
  hub       python -c "import torch; torch.hub.load(REPO, ENTRY, source='local')"
  naive     the original repository's way: build with random initialisation, then copy the weights in

With --safetensors, the file is a user's safetensors file instead, outside the cache: bare is
safetensors.torch.load_file(FILE) (which memory-maps it), hub passes weights=FILE (read into memory,
so that the model does not depend on the file), naive copies load_file's tensors into a random model.

Reported: median wall time and peak resident memory (ru_maxrss) of each, and their ratio to bare.
Targets for hub: at most 1.15x bare's time and 1.1x its peak memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMANDS = {
    "bare": "import torch; torch.load({file!r}, weights_only=True)",
    "hub": "import torch; torch.hub.load({repo!r}, {entry!r}, source='local')",
    "naive": ("import sys, torch; sys.path.insert(0, {repo!r}); from models import create_model; "
              "m = create_model({entry!r}, pretrained=False); "
              "m.load_state_dict(torch.load({file!r}, weights_only=True))"),
}
SAFETENSORS_COMMANDS = {
    "bare": "import safetensors.torch; safetensors.torch.load_file({file!r})",
    "hub": "import torch; torch.hub.load({repo!r}, {entry!r}, source='local', weights={file!r})",
    "naive": ("import sys, safetensors.torch; sys.path.insert(0, {repo!r}); from models import create_model; "
              "m = create_model({entry!r}, pretrained=False); "
              "m.load_state_dict(safetensors.torch.load_file({file!r}))"),
}
TARGETS = {"hub": (1.15, 1.10)}


def run(code: str, env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh Python process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"benchmark command failed: {code}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", default="resnext101_32x16d_swsl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--safetensors", action="store_true", help="a user's safetensors file (weights=FILE)")
    args = parser.parse_args()

    import torch

    from models import WEIGHTS, create_model
    from utils.weights import cache

    with tempfile.TemporaryDirectory() as home:
        file = Path(home) / "hub" / "checkpoints" / WEIGHTS[args.entry].file_name
        file.parent.mkdir(parents=True)
        print(f"writing a random {args.entry} checkpoint (legacy format) to {file} ...", flush=True)
        torch.save(create_model(args.entry, pretrained=False).state_dict(), file, _use_new_zipfile_serialization=False)
        # A random file cannot have the published hash: recorded as verified, as a checked download is.
        os.environ["TORCH_HOME"] = home
        cache.record(file, WEIGHTS[args.entry].hash_prefix.ljust(64, "0"))
        print(f"{file.stat().st_size / 2**20:.0f} MiB; {args.repeats} runs of each, alternating\n", flush=True)

        commands = COMMANDS
        if args.safetensors:
            import safetensors.torch

            commands, legacy = SAFETENSORS_COMMANDS, file
            file = Path(home) / "mine.safetensors"
            safetensors.torch.save_file(torch.load(legacy, weights_only=True), file)
            legacy.unlink()
            print(f"as safetensors: {file}, {file.stat().st_size / 2**20:.0f} MiB\n", flush=True)
        env = {**os.environ, "TORCH_HOME": home, "PYTHONWARNINGS": "ignore"}
        codes = {name: code.format(file=str(file), repo=str(REPO), entry=args.entry) for name, code in commands.items()}
        run(codes["bare"], env)  # warm the page cache
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in codes}
        for _ in range(args.repeats):
            for name, code in codes.items():
                results[name].append(run(code, env))

    base_time = statistics.median(t for t, _ in results["bare"])
    base_rss = statistics.median(m for _, m in results["bare"])
    print(f"{'':6} {'time s (median, min-max)':>26} {'peak RSS MiB':>13} {'time ratio':>11} {'memory ratio':>13}")
    for name, rows in results.items():
        times, rss = [t for t, _ in rows], statistics.median(m for _, m in rows)
        ratio_t, ratio_m = statistics.median(times) / base_time, rss / base_rss
        verdict = ""
        if name in TARGETS:
            ok = ratio_t <= TARGETS[name][0] and ratio_m <= TARGETS[name][1]
            verdict = f"  target <= {TARGETS[name][0]}x / {TARGETS[name][1]}x: {'met' if ok else 'MISSED'}"
        print(f"{name:6} {statistics.median(times):8.2f} ({min(times):.2f}-{max(times):.2f}){'':7} {rss:13.0f} "
              f"{ratio_t:10.2f}x {ratio_m:12.2f}x{verdict}")


if __name__ == "__main__":
    main()
