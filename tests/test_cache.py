"""What reaches the cache, what stays tied to a model, and what is refused: checkpoints under abuse."""
import errno
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models import create_model
from utils import cache as cache_command
from utils.weights import CheckpointError, cache

from .conftest import REPO, cached_names, random_state_dict, save_code_running_pickle


def test_a_users_file_is_read_into_memory_so_saving_over_it_is_safe(tmp_path):
    # In a fresh process: a model memory-mapped onto the file would die of SIGBUS here.
    code = textwrap.dedent(f"""
        import torch
        from models import create_model
        from tests.conftest import random_state_dict
        path = {str(tmp_path / "mine.pth")!r}
        torch.save(random_state_dict("resnet18_ssl", seed=1), path)  # the zip format
        model = create_model("resnet18_ssl", weights=path)
        before = {{k: v.clone() for k, v in model.state_dict().items()}}
        torch.save({{k: torch.zeros_like(v) for k, v in before.items()}}, path)  # overwritten while the model lives
        torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
        torch.save(model.state_dict(), path)  # and saved back, the obvious thing to do after fine-tuning
        torch.testing.assert_close(create_model("resnet18_ssl", weights=path).state_dict(), before, rtol=0, atol=0)
        """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_urls_ending_in_the_same_name_get_their_own_cache_entries(server, tmp_path, torch_home):
    first, second = random_state_dict("resnet18_ssl", seed=1), random_state_dict("resnet18_ssl", seed=2)
    urls = []
    for folder, state_dict in (("a", first), ("b", second)):
        torch.save(state_dict, tmp_path / f"{folder}.pth")
        urls.append(server.serve(tmp_path / f"{folder}.pth", f"{folder}/model.pth"))
    for url, state_dict in zip(urls, (first, second)):
        torch.testing.assert_close(create_model("resnet18_ssl", weights=url).state_dict(), state_dict, rtol=0, atol=0)
    names = cached_names(torch_home)
    assert len(names) == 2 and all(n.startswith("model.") and n.endswith(".pth") for n in names)
    # Cached: the second load of each reads its own file without asking the server.
    server.close()
    for url, state_dict in zip(urls, (first, second)):
        torch.testing.assert_close(create_model("resnet18_ssl", weights=url).state_dict(), state_dict, rtol=0, atol=0)


def test_a_url_whose_name_is_longer_than_a_file_name_may_be(server, resnet18_checkpoint, torch_home):
    url = server.serve(resnet18_checkpoint, "w" * 300 + ".pth")
    create_model("resnet18_ssl", weights=url, progress=False)
    [name] = cached_names(torch_home)
    assert name.startswith("w" * 100) and name.endswith(".pth") and len(name.encode()) <= 200


HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>" + b"x" * 2200 + b"</body></html>\n"


def test_an_html_page_in_place_of_a_checkpoint_is_named_and_not_cached(server, resnet18_checkpoint, tmp_path,
                                                                      torch_home):
    (tmp_path / "page.html").write_bytes(HTML)
    url = server.serve(tmp_path / "page.html", "model.pth")
    with pytest.raises(CheckpointError, match=f"{url} is not a PyTorch checkpoint: it holds an HTML page of "
                       r"2.3 kB \(a login or error page in place of the file\?\). Nothing was cached"):
        create_model("resnet18_ssl", weights=url, progress=False)
    assert cached_names(torch_home) == []
    server.serve(resnet18_checkpoint, "model.pth")  # the server now answers properly
    assert create_model("resnet18_ssl", weights=url, progress=False).pretrained_cfg["head"] == "pretrained"


@pytest.mark.parametrize("content, what", [
    # Fixed bytes: random ones start like JSON ("{", "[") one time in a hundred.
    (b"\x00" + random.Random(0).randbytes(4999), r"5.0 kB of data that is neither of torch.save's formats"),
    (b"", r"nothing \(an empty file\)"),
    (b'{"fc.weight": [1, 2]}', "JSON or text of 21 bytes"),
])
def test_a_file_that_is_not_a_checkpoint_is_called_so(tmp_path, content, what):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"is not a PyTorch checkpoint: it holds {what}: give a file written "
                       r"by torch.save\(model.state_dict\(\), ...\)"):
        create_model("resnet18_ssl", weights=path)


def test_a_code_running_pickle_fetched_by_url_does_not_stay_in_the_cache(server, tmp_path, torch_home):
    marker = tmp_path / "code-ran"
    url = server.serve(save_code_running_pickle(tmp_path / "evil.pth", marker))
    with pytest.raises(CheckpointError, match=f"refused to load {url}: .*could run code when unpickled; it was "
                       "removed from the cache"):
        create_model("resnet18_ssl", weights=url, progress=False)
    assert not marker.exists() and cached_names(torch_home) == []


def test_a_cached_file_is_hashed_again_only_when_it_changes(cached_resnet18, monkeypatch):
    hashed = []
    real_sha256 = cache.sha256
    monkeypatch.setattr(cache, "sha256", lambda path: hashed.append(path) or real_sha256(path))
    reference = create_model("resnet18_ssl").state_dict()
    assert hashed == [cached_resnet18]  # no record yet: hashed once, and recorded
    create_model("resnet18_ssl")
    assert hashed == [cached_resnet18]  # unchanged: not read again

    data = bytearray(cached_resnet18.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    stat = cached_resnet18.stat()
    cached_resnet18.write_bytes(bytes(data))
    os.utime(cached_resnet18, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old time put back
    with pytest.raises(CheckpointError, match=f"the cached checkpoint {cached_resnet18} does not match its SHA-256 "
                       f"prefix .* Remove it with python -m utils.cache clear {cached_resnet18.name} and load"):
        create_model("resnet18_ssl")
    assert cache_command.main(["clear", cached_resnet18.name]) == 0 and not cached_resnet18.exists()
    del reference


def test_the_remedy_for_a_damaged_cached_file_is_quoted_for_the_shell(server, resnet18_checkpoint, tmp_path,
                                                                      torch_home):
    name = "w;touch${IFS}pwned;$(touch${IFS}pwned2)`touch${IFS}pwned3`.pth"
    url = server.serve(resnet18_checkpoint, name)
    create_model("resnet18_ssl", weights=url, progress=False)
    [cached_name] = cached_names(torch_home)
    path = torch_home / "hub" / "checkpoints" / cached_name
    path.write_bytes(path.read_bytes()[:100_000])  # damaged after download
    with pytest.raises(CheckpointError, match="could not read the checkpoint") as error:
        create_model("resnet18_ssl", weights=url)
    assert ".." not in str(error.value)  # one sentence ends once
    command = str(error.value).split("remove it with ")[1].split(" and load again")[0]
    assert command.startswith("python -m utils.cache clear '")
    done = subprocess.run(["bash", "-c", command.replace("python", sys.executable, 1)], cwd=tmp_path,
                          env={**os.environ, "TORCH_HOME": str(torch_home), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not path.exists() and not list(tmp_path.glob("pwned*"))  # removed, and nothing else ran


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(tmp_path, value):
    state_dict = random_state_dict("resnet18_ssl")
    state_dict["layer2.0.conv1.weight"][0, 0, 0, 0] = value
    torch.save(state_dict, tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match=r"diverged.pth holds NaN or infinite values in layer2.0.conv1.weight\. "
                       "The file is damaged, or the training that wrote it diverged"):
        create_model("resnet18_ssl", weights=tmp_path / "diverged.pth")


def odd(kind):
    state_dict = random_state_dict("resnet18_ssl")
    if kind == "integer keys":
        return {i: v for i, v in enumerate(state_dict.values())}
    weight = state_dict["conv1.weight"]
    state_dict["conv1.weight"] = {"int64": weight.long(), "bool": weight > 0, "complex": weight.to(torch.complex64),
                                  "sparse": weight.to_sparse()}[kind]
    return state_dict


@pytest.mark.parametrize("kind, match", [
    ("integer keys", r"does not hold a state dict \(a dict of tensors by parameter name\)"),
    ("int64", r"does not fit resnet18_ssl \(ResNet-18\): wrong types \(1\): conv1.weight: torch.int64 in the file"),
    ("bool", r"wrong types \(1\): conv1.weight: torch.bool in the file"),
    ("complex", r"holds tensors that are not dense real numbers: conv1.weight \(torch.complex64\)"),
    ("sparse", r"holds tensors that are not dense real numbers: conv1.weight \(torch.sparse_coo\)"),
])
def test_a_state_dict_of_the_wrong_kind_is_explained(tmp_path, kind, match):
    torch.save(odd(kind), tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=match):
        create_model("resnet18_ssl", weights=tmp_path / "odd.pth")


def test_a_head_of_another_size_names_num_classes(tmp_path):
    torch.save(create_model("resnet18_ssl", pretrained=False, num_classes=2).state_dict(), tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"Only the classifier differs: the file has a 2-class head, so pass "
                       r"num_classes=2 \(--num-classes 2 on the command line\)"):
        create_model("resnet18_ssl", weights=tmp_path / "two.pth", num_classes=1000)


@pytest.mark.parametrize("where", ["TORCH_HOME is a file", "the cache is a file"])
def test_a_cache_that_cannot_be_written_names_torch_home(server, resnet18_checkpoint, torch_home, where):
    target = torch_home if where == "TORCH_HOME is a file" else torch_home / "hub" / "checkpoints"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"cannot write to the checkpoint cache .*checkpoints \(.*\): set "
                       "TORCH_HOME to a writable directory"):
        create_model("resnet18_ssl", weights=server.serve(resnet18_checkpoint))


@pytest.mark.parametrize("exists", [False, True], ids=["the cache folder cannot be made",
                                                     "no file can be made in the cache folder"])
def test_a_read_only_cache_names_torch_home(server, resnet18_checkpoint, torch_home, monkeypatch, exists):
    """TORCH_HOME on a read-only file system, as the operating system reports it (EROFS), which stops
    root too, where a folder's permission bits would not."""
    cache = torch_home / "hub" / "checkpoints"
    if exists:
        cache.mkdir(parents=True)
    real_open, real_mkdir = os.open, os.mkdir

    def read_only(real):
        def call(path, *args, **kwargs):
            if Path(path).is_relative_to(torch_home):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        return call

    url = server.serve(resnet18_checkpoint)
    with monkeypatch.context() as patched, pytest.raises(CheckpointError, match=(
            r"cannot write to the checkpoint cache .*checkpoints \(Read-only file system\): set TORCH_HOME to a "
            r"writable directory")):
        patched.setattr(os, "open", read_only(real_open))
        patched.setattr(os, "mkdir", read_only(real_mkdir))
        create_model("resnet18_ssl", weights=url)
    assert (list(cache.iterdir()) == []) if exists else not cache.exists()


def test_a_named_pipe_as_weights_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(CheckpointError, match="pipe.pth' is not a regular file"):
        create_model("resnet18_ssl", weights=tmp_path / "pipe.pth")
