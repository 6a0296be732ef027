"""Downloads under faults, concurrent loads, offline use, other hub repositories, bad input.

Faults come from a loopback server on 127.0.0.1 that misbehaves on purpose for the first
request(s) of a path and serves the file properly afterwards.
"""
from __future__ import annotations

import dataclasses
import errno
import http.server
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from models import WEIGHTS, create_model
from utils import cache as cache_command
from utils.weights import CheckpointError
from utils.weights.cache import RECORDS

from .conftest import REPO, cached_names, sha256


class FaultyServer:
    """GET /MODE/N/NAME serves the file NAME, but the first N requests of that path fail as MODE says:
    drop (half the body, then close), stall (headers, a little body, then silence), 404, 500, or
    redirect (to /ok/0/NAME). Whatever N, MODE slow serves the file in paced 1 MiB pieces, trickle
    sends 1 KiB every 0.2 s, and pause sends 1 MiB, then nothing for a minute."""

    def __init__(self, root: Path):
        self.root, self.requests, self.counts = root, [], {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                _, mode, failures, name = self.path.split("/", 3)
                seen = server.counts[self.path] = server.counts.get(self.path, 0) + 1
                body = (server.root / name).read_bytes()
                if seen > int(failures) and mode not in ("slow", "trickle", "pause"):
                    mode = "ok"
                if mode in ("404", "500"):
                    self.send_error(int(mode))
                    return
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", f"/ok/0/{name}")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif mode == "stall":
                    self.wfile.write(body[:1000])
                    self.wfile.flush()
                    time.sleep(4)
                    self.close_connection = True
                elif mode == "trickle":
                    for start in range(0, len(body), 1024):
                        self.wfile.write(body[start:start + 1024])
                        self.wfile.flush()
                        time.sleep(0.2)
                elif mode == "pause":
                    self.wfile.write(body[:1 << 20])
                    self.wfile.flush()
                    time.sleep(60)
                    self.close_connection = True
                elif mode == "slow":
                    for start in range(0, len(body), 1 << 20):
                        self.wfile.write(body[start:start + (1 << 20)])
                        time.sleep(0.03)
                else:
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def faulty(resnet18_checkpoint):
    server = FaultyServer(resnet18_checkpoint.parent)
    yield server
    server.httpd.shutdown()


@pytest.mark.parametrize("mode, message", [
    ("drop", r"the connection closed after [\d,]+ of [\d,]+ bytes"),
    ("stall", r"no data for 1 s \(set SEMI_SUPERVISED_DOWNLOAD_TIMEOUT to wait longer\)"),
    ("404", "HTTP 404 Not Found"),
    ("500", "HTTP 500 Internal Server Error"),
])
def test_a_failed_download_says_why_caches_nothing_and_the_next_attempt_succeeds(
        faulty, resnet18_checkpoint, torch_home, monkeypatch, mode, message):
    monkeypatch.setenv("SEMI_SUPERVISED_DOWNLOAD_TIMEOUT", "1")
    url = f"{faulty.url}/{mode}/1/{resnet18_checkpoint.name}"
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"could not download {url}: {message}\. Nothing was cached; try again"):
        create_model("resnet18_ssl", weights=url, progress=False)
    assert time.monotonic() - start < 3  # a stalled server costs the timeout, not forever
    assert cached_names(torch_home) == []  # no partial file, no corrupt file
    model = create_model("resnet18_ssl", weights=url, progress=False)
    assert model.pretrained_cfg["source"] == url and cached_names(torch_home) == [resnet18_checkpoint.name]


def test_a_redirect_is_followed(faulty, resnet18_checkpoint, torch_home):
    url = f"{faulty.url}/redirect/1/{resnet18_checkpoint.name}"
    create_model("resnet18_ssl", weights=url, progress=False)
    assert faulty.requests == [f"/redirect/1/{resnet18_checkpoint.name}", f"/ok/0/{resnet18_checkpoint.name}"]
    assert cached_names(torch_home) == [resnet18_checkpoint.name]


@pytest.mark.parametrize("variable, value, expected", [
    ("SEMI_SUPERVISED_DOWNLOAD_TIMEOUT", "soon", "a number of seconds from above 0 to 86400"),
    ("SEMI_SUPERVISED_DOWNLOAD_TIMEOUT", "inf", "a number of seconds from above 0 to 86400"),
    ("SEMI_SUPERVISED_DOWNLOAD_TIMEOUT", "nan", "a number of seconds"),
    ("SEMI_SUPERVISED_DOWNLOAD_TIMEOUT", "0", "a number of seconds"),
    ("SEMI_SUPERVISED_DOWNLOAD_MIN_RATE", "-1", "a rate in kB/s from 0 to 86400"),
    ("SEMI_SUPERVISED_DOWNLOAD_MIN_RATE", "fast", "a rate in kB/s"),
])
def test_a_bad_download_setting_is_named(faulty, resnet18_checkpoint, monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(f"{variable}={value!r}: expected {expected}")):
        create_model("resnet18_ssl", weights=f"{faulty.url}/ok/0/{resnet18_checkpoint.name}")


def test_a_trickling_server_fails_in_bounded_time_naming_the_rate_and_the_variable(
        faulty, resnet18_checkpoint, torch_home, monkeypatch):
    # 1 KiB every 0.2 s never leaves the socket silent for the 1 s timeout, and would take hours.
    monkeypatch.setenv("SEMI_SUPERVISED_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.delenv("SEMI_SUPERVISED_DOWNLOAD_MIN_RATE", raising=False)
    url = f"{faulty.url}/trickle/0/{resnet18_checkpoint.name}"
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=re.escape(f"could not download {url}: the server sent ")
                       + r"[\d.]+ kB/s over the last 1 s, under the minimum of 32 kB/s \(set "
                       r"SEMI_SUPERVISED_DOWNLOAD_MIN_RATE to accept slower downloads"):
        create_model("resnet18_ssl", weights=url, progress=False)
    assert time.monotonic() - start < 5
    assert cached_names(torch_home) == []


def wait_for(condition, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signal_, then", [(signal.SIGKILL, "load"), (signal.SIGTERM, "clear")])
def test_a_killed_download_leaves_nothing_behind_and_a_live_one_is_left_alone(
        faulty, resnet18_checkpoint, torch_home, monkeypatch, capsys, signal_, then):
    name = resnet18_checkpoint.name
    monkeypatch.setitem(WEIGHTS, "resnet18_ssl", dataclasses.replace(WEIGHTS["resnet18_ssl"], file_name=name))
    cache = torch_home / "hub" / "checkpoints"
    script = f"from models import create_model; create_model('resnet18_ssl', weights='{faulty.url}/pause/0/{name}')"
    env = {**os.environ, "TORCH_HOME": str(torch_home), "SEMI_SUPERVISED_DOWNLOAD_TIMEOUT": "120"}
    loader = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        partials = lambda: list(cache.glob(f".{name}.*.partial"))  # noqa: E731
        wait_for(lambda: partials() and partials()[0].stat().st_size >= 1 << 20)
        # While it downloads, the cache command sees it as such and removes nothing of it.
        assert cache_command.main(["list"]) == 0 and "(downloading)" in capsys.readouterr().out
        assert cache_command.main(["clear"]) == 0 and f"left alone: {name}" in capsys.readouterr().out
        assert len(partials()) == 1 and (cache / f".{name}.lock").exists()
    finally:
        loader.send_signal(signal_)
        loader.wait(timeout=60)
    assert cached_names(torch_home) == sorted([partials()[0].name, f".{name}.lock"])  # what the kill left
    assert cache_command.main(["list"]) == 0 and "(left over)" in capsys.readouterr().out
    if then == "load":  # the next download, holding the lock, knows the partial file is stale
        create_model("resnet18_ssl", weights=f"{faulty.url}/ok/0/{name}", progress=False)
        assert cached_names(torch_home) == [name]
    else:
        assert cache_command.main(["clear"]) == 0
        assert cached_names(torch_home) == []


def test_processes_loading_the_same_missing_checkpoint_share_one_download(faulty, resnet18_checkpoint, torch_home):
    url = f"{faulty.url}/slow/0/{resnet18_checkpoint.name}"
    script = f"from models import create_model; create_model('resnet18_ssl', weights={url!r}, progress=False)"
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    workers = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    results = [(w.wait(timeout=120), w.stderr.read()) for w in workers]
    assert all(code == 0 for code, _ in results), results
    assert faulty.requests == [f"/slow/0/{resnet18_checkpoint.name}"]  # one download, the others waited for it
    assert sum("Downloading:" in err for _, err in results) == 1
    assert cached_names(torch_home) == [resnet18_checkpoint.name]


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: any connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_offline_a_cached_checkpoint_loads_without_any_connection(cached_resnet18, monkeypatch):
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", refused_url())
    model = create_model("resnet18_ssl")
    assert model.pretrained_cfg["head"] == "pretrained"
    # And without the file, the same mirror fails at once, naming the remedy: so the load above made no connection.
    cached_resnet18.unlink()
    with pytest.raises(CheckpointError, match="Connection refused.*SEMI_SUPERVISED_WEIGHTS_MIRROR"):
        create_model("resnet18_ssl", progress=False)


# Other hub repositories with top-level "models" and "utils" packages, as ultralytics/yolov5 and
# facebookresearch/detr have.
OTHER_HUBCONF = '''
dependencies = ["torch"]
from models.common import make
from utils.general import tag

def detector(**kwargs):
    """Another repository's entry."""
    return make(tag())
'''


@pytest.fixture
def other_repo(tmp_path) -> Path:
    repo = tmp_path / "other"
    for package, module, code in (("models", "common", "def make(tag):\n    return {'made_by': tag}\n"),
                                  ("utils", "general", "def tag():\n    return 'other utils'\n")):
        (repo / package).mkdir(parents=True)
        (repo / package / "__init__.py").write_text(f"NAME = 'other {package}'\n")
        (repo / package / f"{module}.py").write_text(code)
    (repo / "hubconf.py").write_text(OTHER_HUBCONF)
    return repo


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


LOAD_OURS = f"ours = torch.hub.load({str(REPO)!r}, 'resnet18_ssl', source='local', pretrained=False)\n"
CHECK_OURS = ("assert ours(torch.randn(1, 3, 64, 64)).shape == (1, 1000)\n"
              "assert ours.optimize_for_inference()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)\n")
CHECK_OTHER = ("assert other == {'made_by': 'other utils'}, other\n"
               "import models, utils\n"
               "assert models.NAME == 'other models' and utils.NAME == 'other utils'\n"
               "assert sys.modules['models.common'].make('x') == {'made_by': 'x'}\n")


@pytest.mark.parametrize("order", ["other first", "ours first"])
def test_coexists_with_a_hub_repository_that_has_models_and_utils_packages(other_repo, tmp_path, order):
    load_other = f"other = torch.hub.load({str(other_repo)!r}, 'detector', source='local')\n"
    first, second = (load_other, LOAD_OURS) if order == "other first" else (LOAD_OURS, load_other)
    done = run_python("import sys, torch\n" + first + second + CHECK_OURS + CHECK_OTHER
                      + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'utils')))\n",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # Only the other repository's packages are under the top-level names; ours live under a private name.
    assert done.stdout.strip() == "['models', 'models.common', 'utils', 'utils.general']"


def test_a_users_own_utils_and_models_modules_stay_theirs(tmp_path):
    (tmp_path / "utils.py").write_text("MINE = 'my utils'\n")
    (tmp_path / "models.py").write_text("MINE = 'my models'\n")
    done = run_python("import sys, torch, utils, models\n" + LOAD_OURS + CHECK_OURS
                      + "import utils as u, models as m\nassert (u.MINE, m.MINE) == ('my utils', 'my models')\n",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# python -m utils.cache


def test_checkpoints_list_verify_clear(cached_resnet18, capsys):
    (cached_resnet18.parent / f".{cached_resnet18.name}.0123.partial").write_bytes(b"half")
    (cached_resnet18.parent / "someone_elses.pth").write_bytes(b"not ours")
    assert cache_command.main(["list"]) == 0
    out = capsys.readouterr().out
    size = f"{cached_resnet18.stat().st_size / 2**20:.1f} MiB"
    assert "1 of 12 checkpoint(s)" in out and "resnet18_ssl" in out and size in out
    assert "(left over)" in out and "someone_elses" not in out
    assert cache_command.main(["verify"]) == 0
    assert "ok  resnet18_ssl" in capsys.readouterr().out
    assert cache_command.main(["clear"]) == 0
    assert sorted(p.name for p in cached_resnet18.parent.iterdir()) == ["someone_elses.pth"]
    assert cache_command.main(["verify"]) == 0 and "no checkpoints cached" in capsys.readouterr().out


def test_checkpoints_verify_finds_a_damaged_file_and_says_how_to_fix_it(cached_resnet18, capsys):
    data = bytearray(cached_resnet18.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    cached_resnet18.write_bytes(bytes(data))
    assert cache_command.main(["verify", "resnet18_ssl"]) == 1
    out, err = capsys.readouterr()
    assert "BAD resnet18_ssl" in out
    assert "Remove them with: python -m utils.cache clear resnet18_ssl" in err


def test_checkpoints_refuses_an_unknown_entry(capsys):
    with pytest.raises(SystemExit) as exit_:
        cache_command.main(["clear", "resnet19_ssl"])
    assert exit_.value.code == 2 and "unknown entry 'resnet19_ssl'" in capsys.readouterr().err


def test_python_m_utils_cache(torch_home):
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    done = subprocess.run([sys.executable, "-m", "utils.cache", "list"], cwd=REPO, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0 and f"{torch_home / 'hub' / 'checkpoints'}: 0 of 12 checkpoint(s)" in done.stdout



def test_the_cache_command_without_arguments_names_what_is_missing(capsys):
    with pytest.raises(SystemExit) as exit_:
        cache_command.main([])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last == ("python -m utils.cache: error: the following arguments are required: "
                                              "command")


# Bad input to the models


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(3, 224, 224), ValueError, r"shape \(N, 3, H, W\), got shape \(3, 224, 224\): add the batch dimension"),
    (torch.randn(1, 224, 224, 3), ValueError, r"3 colour channels.*channels last\? use x.permute\(0, 3, 1, 2\)"),
    (torch.randn(1, 1, 224, 224), ValueError, r"3 colour channels, \(N, 3, H, W\), got shape \(1, 1, 224, 224\)$"),
    (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), TypeError, "float input, got torch.uint8: model.preprocess"),
    (torch.randn(1, 3, 64, 64, dtype=torch.float64), TypeError,
     r"input is torch.float64 on cpu but the model is torch.float32 on cpu: use x.to\('cpu', torch.float32\)"),
    (torch.randn(1, 3, 16, 300), ValueError, "at least 32x32 pixels, got 16x300"),
    ("cat.jpg", TypeError, "expected a tensor of images .*got str"),
])
@pytest.mark.parametrize("features_only", [False, True])
def test_bad_input_tensors_are_named(x, error, match, features_only):
    model = create_model("resnet18_ssl", pretrained=False, features_only=features_only)
    with pytest.raises(error, match=match):
        model(x)


def test_a_damaged_verification_record_is_ignored_and_a_full_clear_removes_the_records(cached_resnet18, capsys):
    records = cached_resnet18.parent / RECORDS
    records.write_text(json.dumps({str(cached_resnet18.resolve()): "x", "/elsewhere.pth": {"stat": 1}}))
    assert create_model("resnet18_ssl").pretrained_cfg["head"] == "pretrained"  # hashed again, not fatal
    assert cache_command.main(["clear"]) == 0 and not records.exists()


def test_files_cached_from_other_urls_are_listed_and_cleared_and_others_left_alone(cached_resnet18, capsys):
    cache = cached_resnet18.parent
    mine = cache / "weights.0123456789ab.pth"
    mine.write_bytes(b"x" * 2**20)
    partial = cache / f".{mine.name}.{'f' * 32}.partial"
    partial.write_bytes(b"half")
    (cache / "someone_elses.pth").write_bytes(b"not ours")
    assert cache_command.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "1 of 12 checkpoint(s), and 1 from other URLs" in out and "(from a URL)" in out and mine.name in out
    assert partial.name in out and "someone_elses" not in out
    assert cache_command.main(["clear"]) == 0
    assert "2 checkpoint(s) removed" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == ["someone_elses.pth"]


def test_clear_removes_only_what_this_repository_downloaded_not_files_it_verified(cached_resnet18, server,
                                                                                  resnet18_checkpoint, capsys):
    cache = cached_resnet18.parent
    theirs = cache / resnet18_checkpoint.name  # another project's (torchvision's) resnet18-<sha>.pth
    shutil.copyfile(resnet18_checkpoint, theirs)
    served = resnet18_checkpoint.with_name(f"other_{resnet18_checkpoint.name}")
    shutil.copyfile(resnet18_checkpoint, served)
    ours = cache / served.name
    create_model("resnet18_ssl", weights=theirs)  # loaded once, so verified and recorded
    create_model("resnet18_ssl", weights=server.serve(served))  # downloaded under its own name
    assert ours.exists()
    assert cache_command.main(["clear"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == [theirs.name], capsys.readouterr().out
    assert sha256(theirs) == sha256(resnet18_checkpoint)


def test_clear_names_what_it_cannot_find_and_an_unwritable_cache_is_one_line(cached_resnet18, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cache_command.main(["clear", "../checkpoints/link_out"])
    assert "unknown entry '../checkpoints/link_out'; choose from" in capsys.readouterr().err
    real = pathlib.Path.unlink

    def read_only(path, missing_ok=False):  # as a read-only file system answers, also to root
        if path.parent == cached_resnet18.parent:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    assert cache_command.main(["clear", "resnet18_ssl"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "could not remove" in err and "(Read-only file system)" in err
    assert cached_resnet18.exists()


def test_a_failed_download_names_the_offline_way_and_is_caught_as_a_runtime_error(torch_home):
    try:  # as a notebook user writes it: the class is a built-in one
        torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=f"{refused_url()}/r18-0123abcd.pth")
    except RuntimeError as e:
        message = str(e)
    else:
        pytest.fail("no error")
    assert "pass pretrained=False (--no-pretrained on the command line)" in message
    assert "check the URL" not in message
