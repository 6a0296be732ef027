"""Shared fixtures: an isolated torch.hub cache, a loopback HTTP server and generated checkpoints.

Nothing here touches the network: checkpoints are made by the tests in torch's legacy (pre-1.6)
format, as the published files are, and served from 127.0.0.1.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import shutil
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

from models import WEIGHTS, create_model
from utils.weights.cache import RECORDS

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Under pytest-xdist the workers share the cores: one torch thread pool each, not one per core each.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The user's settings that change what the tests measure: a proxy (the loopback servers would be
# reached through it), the download limits, a mirror, torch.hub's cache.
PINNED_AWAY = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "SEMI_SUPERVISED_WEIGHTS_MIRROR",
               "SEMI_SUPERVISED_DOWNLOAD_TIMEOUT", "SEMI_SUPERVISED_DOWNLOAD_MIN_RATE")


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """Every test gets an empty torch.hub cache, found through TORCH_HOME as a user's would be, and
    none of the user's proxy, mirror or download settings."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for name in PINNED_AWAY:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return home


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_legacy(state_dict: dict, directory: Path, stem: str) -> Path:
    """Save like the published files: legacy format, named <stem>-<first 8 hex digits of the SHA-256>.pth."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{stem}.tmp"
    torch.save(state_dict, tmp, _use_new_zipfile_serialization=False)
    return tmp.rename(directory / f"{stem}-{sha256(tmp)[:8]}.pth")


def random_state_dict(entry: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the entry's architecture whose BatchNorm statistics are not the trivial 0/1,
    so that loading it (or failing to) shows in the outputs."""
    torch.manual_seed(seed)
    return randomize_statistics(create_model(entry, pretrained=False).state_dict())


@torch.no_grad()
def randomize_statistics(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give BatchNorm statistics and affine weights, and biases, values away from 0/1, in place."""
    for key, value in state_dict.items():
        if key.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight")):
            value.uniform_(0.5, 1.5)
        elif key.endswith(("running_mean", ".bias")):
            value.uniform_(-0.2, 0.2)
    return state_dict


def cached_names(torch_home: Path) -> list[str]:
    """The cache's files (partial downloads and locks included), without the verification records."""
    directory = torch_home / "hub" / "checkpoints"
    return sorted(p.name for p in directory.iterdir() if p.name != RECORDS) if directory.exists() else []


def save_code_running_pickle(path: Path, marker: Path) -> Path:
    """A legacy-format checkpoint whose unpickling would create the directory ``marker``."""

    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"fc.weight": torch.zeros(1), "payload": Exploit()}, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="session")
def resnet18_checkpoint(tmp_path_factory) -> Path:
    """A legacy-format ResNet-18 checkpoint, made once per session."""
    return save_legacy(random_state_dict("resnet18_ssl"), tmp_path_factory.mktemp("checkpoints"), "resnet18")


@pytest.fixture
def cached_resnet18(resnet18_checkpoint, torch_home, monkeypatch) -> Path:
    """The generated checkpoint in the cache as the registry's resnet18_ssl file: the registry entry
    is pointed at its name, since a generated file cannot have the published hash."""
    name = f"semi_supervised_resnet18-{resnet18_checkpoint.name.rsplit('-', 1)[1]}"
    monkeypatch.setitem(WEIGHTS, "resnet18_ssl", dataclasses.replace(WEIGHTS["resnet18_ssl"], file_name=name))
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    path = cache / name
    path.write_bytes(resnet18_checkpoint.read_bytes())
    return path


class Server:
    """A static file server on 127.0.0.1 that counts the requests it answers."""

    def __init__(self, root: Path):
        self.root, self.requests, self.names = root, [], {}
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                server.requests.append(self.path)

            def translate_path(self, path):  # any URL name, also one longer than a file name may be
                return str(server.names.get(urllib.parse.unquote(path), super().translate_path(path)))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path: Path, name: str | None = None) -> str:
        """Put a copy of ``path`` on the server (as ``name``) and return its URL."""
        name = name or path.name
        fits = "/" not in name and len(name.encode()) < 250  # else stored under another name
        copy = self.root / (name if fits else f"{len(self.names)}-{path.name}")
        shutil.copyfile(path, copy)
        self.names["/" + name] = copy
        return self.url + name

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    s = Server(root)
    yield s
    s.close()
