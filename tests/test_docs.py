"""The README stays true: its table is the registry's, its examples run, CI runs its test command."""
import re
import runpy
import shlex
import subprocess
import sys

import pytest
import torch

from models import WEIGHTS
from models.registry import markdown_table
from utils.weights import cache as weights_cache

from .conftest import REPO, random_state_dict

README = (REPO / "README.md").read_text(encoding="utf-8")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_model_table_is_the_registrys():
    assert markdown_table() in README


def python_m_models(monkeypatch, capsys, *args) -> str:
    """``python -m models ARGS``, run as python runs it, in this process."""
    monkeypatch.setattr(sys, "argv", ["models", *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("models", run_name="__main__")
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_python_m_models_prints_the_table(monkeypatch, capsys):
    assert python_m_models(monkeypatch, capsys).strip() == markdown_table()


def test_python_m_models_entry_prints_its_hub_help(monkeypatch, capsys):
    out = python_m_models(monkeypatch, capsys, "resnext101_32x8d_swsl")
    assert out.strip() == WEIGHTS["resnext101_32x8d_swsl"].docstring().strip()


def pip_install(line: str) -> list[str]:
    """The packages and requirement files a shell line's ``pip install`` names."""
    words = shlex.split(line.split("pip install", 1)[1].split("&&", 1)[0])
    return [w for w in words if not w.startswith("--")]


def test_the_two_commands_at_the_top_run_as_written():
    first, second = re.search(r"```sh\n(.*?)```", README, flags=re.S)[1].strip().splitlines()
    setup, command = first.rsplit(" && ", 1)
    # The set-up installs what CI installs (CI's requirements file includes the README's), and the second
    # line is CI itself.
    ci = (REPO / ".ci" / "run").read_text()
    installs = [w for line in ci.splitlines() if "pip install" in line for w in pip_install(line)]
    readme_installs = pip_install(setup)
    torch_pin = next(w for w in readme_installs if w.startswith("torch"))
    assert torch_pin in installs and "python3 -m venv" in setup, (setup, installs)
    for i, word in enumerate(readme_installs):
        if word == "-r":
            ci_files = [installs[j + 1] for j, w in enumerate(installs) if w == "-r"]
            included = {f: (REPO / f).read_text() for f in ci_files}
            assert any(f == readme_installs[i + 1] or f"-r {readme_installs[i + 1]}" in t for f, t in included.items())
    assert second == "bash .ci/run"
    # The set-up is CI's (tested by CI itself); the command runs here, without the published files.
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "utils.classify"]
    done = subprocess.run([sys.executable, *args[1:], "--no-pretrained", "--workers", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# random weights (--no-pretrained)") and "rocket.jpg" in done.stdout


def test_ci_removes_its_environment_whatever_the_outcome():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    made = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv"))
    assert lines[made] == 'python3 -m venv "$work/venv"' and 'work="$(mktemp -d)"' in lines[:made]
    assert any(line.startswith("""trap 'rm -rf "$work"' EXIT""") for line in lines[:made])


def test_ci_runs_exactly_the_readme_test_command():
    command = re.search(r"```sh\n(.*?)```", README.split("The test command", 1)[1], flags=re.S)[1].strip()
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command


EXAMPLES = [block for block in code_blocks("python") if 'torch.hub.load(".", ' in block]
# What the suite cannot have: GitHub and the Hugging Face Hub (no network here), and torchvision (not
# importable beside the CPU torch).
NEEDS_WHAT_THE_SUITE_LACKS = ('torch.hub.load("OWNER/REPO", ', "upload_folder(", "from torchvision")


def test_every_python_example_in_the_readme_is_run():
    """Every python block runs below, unless it needs what the suite cannot have: a changed example is
    never silently left out."""
    left_out = [block for block in code_blocks("python") if block not in EXAMPLES]
    assert EXAMPLES and all(any(need in block for need in NEEDS_WHAT_THE_SUITE_LACKS) for block in left_out), left_out


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda b: b.split("\n")[0][:40])
def test_readme_examples_run(block, torch_home, tmp_path, monkeypatch):
    """Each example, pointed at this checkout, with generated checkpoints already in the cache and
    recorded as verified there (a generated file cannot have the published hash)."""
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for entry in set(re.findall(r'torch\.hub\.load\("\.", "(\w+)"', block)):
        path = cache / WEIGHTS[entry].file_name
        torch.save(random_state_dict(entry), path, _use_new_zipfile_serialization=False)
        weights_cache.record(path, WEIGHTS[entry].hash_prefix.ljust(64, "0"))
    if "runs/flowers/best.pth" in block:  # what python -m utils.finetune saves
        from models import finetuned
        state = random_state_dict("resnet50_swsl")
        state["fc.weight"], state["fc.bias"] = state["fc.weight"][:5], state["fc.bias"][:5]
        described = finetuned.describe("resnet50_swsl", ["daisy", "dandelion", "rose", "sunflower", "tulip"], 224,
                                       0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), {})
        (tmp_path / "runs" / "flowers").mkdir(parents=True)
        torch.save({"model": state, "pretrained_cfg": described}, tmp_path / "runs" / "flowers" / "best.pth")
    monkeypatch.chdir(tmp_path)
    code = block.replace('torch.hub.load(".", ', f"torch.hub.load({str(REPO)!r}, ").replace(
        '"utils/samples/', f'"{REPO / "utils" / "samples"}/')
    exec(compile(code, "README.md", "exec"), {"torch": torch})
