"""Downloading, verifying and loading checkpoints: the real code against a loopback server."""
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from models import WEIGHTS, create_model
from utils.weights import CheckpointError, checkpoint
from utils.weights.cache import hash_prefix

from .conftest import REPO, cached_names, random_state_dict, save_code_running_pickle, save_legacy, sha256

X = torch.randn(2, 3, 64, 64)


def reference(checkpoint_path, entry="resnet18_ssl", **kwargs):
    """An untrained model with the checkpoint loaded the plain way, to compare against."""
    model = create_model(entry, pretrained=False, **kwargs)
    model.load_state_dict(torch.load(checkpoint_path, weights_only=True))
    return model


def test_download_into_torch_home_verified_then_offline(server, resnet18_checkpoint, torch_home):
    url = server.serve(resnet18_checkpoint)
    model = create_model("resnet18_ssl", weights=url, progress=False)
    assert cached_names(torch_home) == [resnet18_checkpoint.name]
    assert sha256(torch_home / "hub/checkpoints" / resnet18_checkpoint.name) == sha256(resnet18_checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(resnet18_checkpoint)(X), rtol=0, atol=0)
    assert model.pretrained_cfg["source"] == url and model.pretrained_cfg["pretrained"] is True
    assert model.pretrained_cfg["head"] == "pretrained"

    server.close()  # the cached file is used: no second request is needed
    again = create_model("resnet18_ssl", weights=url)
    assert server.requests.count("/" + resnet18_checkpoint.name) == 1
    assert torch.equal(again.fc.weight, model.fc.weight)


def test_weights_are_assigned_not_copied_and_nothing_is_left_on_meta(server, resnet18_checkpoint, monkeypatch):
    loaded = []  # what the real load_checkpoint returned: the tensors torch.load made

    def recorded(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    real = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", recorded)
    model = create_model("resnet18_ssl", weights=server.serve(resnet18_checkpoint))
    (state_dict, _), = loaded
    tensors = dict(model.state_dict(keep_vars=True))
    assert tensors.keys() == state_dict.keys()
    # Assigned: each parameter and buffer is the loaded tensor's memory, not a copy made beside it.
    assert all(tensors[k].data_ptr() == state_dict[k].data_ptr() for k in tensors)
    assert not any(t.is_meta for t in tensors.values())
    assert all(t.dtype in (torch.float32, torch.int64) for t in tensors.values())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_on_and_off(server, resnet18_checkpoint, torch_home, progress):
    # In a fresh process without TQDM_DISABLE: tqdm reads it once, when imported, and a user's
    # setting would hide the bar whatever progress says.
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | {"TORCH_HOME": str(torch_home)}
    url = server.serve(resnet18_checkpoint)
    code = f"from models import create_model; create_model('resnet18_ssl', weights={url!r}, progress={progress})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert f'Downloading: "{url}"' in result.stderr
    assert bool(re.search(r"(?m)^100%\|█+\| ", result.stderr)) is progress  # tqdm's bar, full at the end


def test_hash_mismatch_names_url_expected_and_actual_and_caches_nothing(server, resnet18_checkpoint, torch_home):
    url = server.serve(resnet18_checkpoint, "resnet18-0123abcd.pth")
    actual = sha256(resnet18_checkpoint)[:8]
    with pytest.raises(CheckpointError, match=f"SHA-256 mismatch for {url}: expected .*0123abcd, got {actual}"):
        create_model("resnet18_ssl", weights=url)
    assert cached_names(torch_home) == []


def test_http_404_is_a_clear_error_and_caches_nothing(server, torch_home):
    url = server.url + "missing-0123abcd.pth"
    with pytest.raises(CheckpointError, match=f"could not download {url}: HTTP 404.*weights=<its path>"):
        create_model("resnet18_ssl", weights=url)
    assert cached_names(torch_home) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_mirror_on_this_machine_is_fetched_directly_whatever_proxy_is_set(server, resnet18_checkpoint,
                                                                            monkeypatch, torch_home, host):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a closed port: a request sent through it fails
    url = server.serve(resnet18_checkpoint).replace("127.0.0.1", host)
    model = create_model("resnet18_ssl", weights=url, progress=False)
    assert server.requests.count("/" + resnet18_checkpoint.name) == 1
    with torch.no_grad():
        assert torch.equal(model(X), reference(resnet18_checkpoint)(X))
    # Any other host goes through the proxy, as urllib sends it: here refused at the closed port.
    with pytest.raises(CheckpointError, match="could not download http://weights.example/w-0123abcd.pth: .*refused"):
        create_model("resnet18_ssl", weights="http://weights.example/w-0123abcd.pth")
    assert cached_names(torch_home) == [resnet18_checkpoint.name]


def test_weights_file_url_is_read_in_place_not_copied_into_the_cache(resnet18_checkpoint, torch_home):
    model = create_model("resnet18_ssl", weights=resnet18_checkpoint.as_uri())
    assert cached_names(torch_home) == []
    torch.testing.assert_close(model(X), reference(resnet18_checkpoint)(X), rtol=0, atol=0)


def test_weights_local_path_is_used_in_place_and_hash_checked(resnet18_checkpoint, tmp_path, torch_home):
    model = create_model("resnet18_ssl", weights=resnet18_checkpoint)
    torch.testing.assert_close(model(X), reference(resnet18_checkpoint)(X), rtol=0, atol=0)
    assert cached_names(torch_home) == [] and model.pretrained_cfg["source"] == str(resnet18_checkpoint)

    bad = tmp_path / "resnet18-0123abcd.pth"
    shutil.copyfile(resnet18_checkpoint, bad)
    with pytest.raises(CheckpointError, match=r"expected a hash starting 0123abcd.* \(file names ending in -HEX are "
                       "checked against that hash prefix\\), rename the file"):
        create_model("resnet18_ssl", weights=str(bad))


def test_weights_path_without_hash_and_in_zip_format(tmp_path):
    state_dict = random_state_dict("resnet18_ssl", seed=3)
    path = tmp_path / "finetuned.pth"
    torch.save(state_dict, path)  # the current zip format: loaded memory-mapped
    model = create_model("resnet18_ssl", weights=path)
    torch.testing.assert_close(model.state_dict(), state_dict, rtol=0, atol=0)


def test_training_checkpoints_and_dataparallel_prefixes_are_unwrapped(tmp_path):
    state_dict = random_state_dict("resnet18_ssl", seed=4)
    path = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    torch.testing.assert_close(create_model("resnet18_ssl", weights=path).state_dict(), state_dict, rtol=0, atol=0)


def test_missing_weights_file():
    with pytest.raises(FileNotFoundError, match="weights='nowhere.pth': no such file"):
        create_model("resnet18_ssl", weights="nowhere.pth")


@pytest.mark.parametrize("weights, error, match", [
    (42, TypeError, "weights must be None, a file path or a URL, got int"),
    ("ftp://example.org/x.pth", ValueError, "only http://, https:// and file:// URLs"),
])
def test_bad_weights_argument(weights, error, match):
    with pytest.raises(error, match=match):
        create_model("resnet18_ssl", weights=weights)


def test_keys_that_do_not_fit_are_listed(tmp_path):
    state_dict = random_state_dict("resnet18_ssl")
    del state_dict["layer1.0.bn1.running_mean"]
    state_dict["extra.weight"] = torch.zeros(1)
    state_dict["fc.weight"] = torch.zeros(10, 512)
    path = save_legacy(state_dict, tmp_path, "broken")
    with pytest.raises(CheckpointError) as error:
        create_model("resnet18_ssl", weights=path)
    message = str(error.value)
    assert "missing keys (1): layer1.0.bn1.running_mean" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "wrong shapes (1): fc.weight: (10, 512) in the file, (1000, 512) in the model" in message


def test_checkpoint_of_another_architecture_names_the_entries_it_fits(resnet18_checkpoint, tmp_path):
    match = (r"does not fit resnet50_ssl \(ResNet-50\): it holds a ResNet-18; load it with resnet18_ssl or "
             r"resnet18_swsl \(--model resnet18_ssl\)$")
    with pytest.raises(CheckpointError, match=match):
        create_model("resnet50_ssl", weights=resnet18_checkpoint)
    # One that fits no architecture gets the keys and shapes that differ.
    state_dict = torch.load(resnet18_checkpoint, weights_only=True)
    del state_dict["layer4.1.bn2.running_var"]
    torch.save(state_dict, tmp_path / "partial.pth")
    match = r"does not fit resnet50_ssl \(ResNet-50\): missing keys \(199\).*wrong shapes \(24\).*same architecture$"
    with pytest.raises(CheckpointError, match=match) as error:
        create_model("resnet50_ssl", weights=tmp_path / "partial.pth")
    # 199 missing keys are shown by their first 8, then "...": one line a reader takes in.
    missing = str(error.value).split("missing keys (199): ", 1)[1].split(";", 1)[0]
    assert missing.endswith(", ...") and len(missing.split(", ")) == 9, missing


def test_damaged_cached_file_names_the_file_and_the_remedy(resnet18_checkpoint, torch_home):
    path = torch_home / "hub" / "checkpoints" / WEIGHTS["resnet18_ssl"].file_name
    path.parent.mkdir(parents=True)
    path.write_bytes(resnet18_checkpoint.read_bytes()[: 10_000_000])  # an interrupted copy
    with pytest.raises(CheckpointError, match=f"the cached checkpoint {path} does not match its SHA-256 prefix "
                       f"d92f0530 .*Remove it with python -m utils.cache clear {path.name} and load again"):
        create_model("resnet18_ssl")


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = save_code_running_pickle(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError, match="refused to load .*evil.pth"):
        create_model("resnet18_ssl", weights=path)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        create_model("resnet18_ssl", weights=path)


def published(monkeypatch, checkpoint):
    """Make resnet18_ssl's published file one the tests generated: same name pattern, a hash that matches."""
    name = "semi_supervised_resnet18-" + sha256(checkpoint)[:8] + ".pth"
    monkeypatch.setitem(WEIGHTS, "resnet18_ssl", dataclasses.replace(WEIGHTS["resnet18_ssl"], file_name=name))
    return name


@pytest.mark.parametrize("as_directory", [False, True])
def test_mirror_variable_replaces_the_published_base_url(server, resnet18_checkpoint, monkeypatch, torch_home,
                                                         as_directory):
    name = published(monkeypatch, resnet18_checkpoint)
    server.serve(resnet18_checkpoint, name)
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", str(server.root) if as_directory else server.url)
    model = create_model("resnet18_ssl")
    expected_source = (server.root / name).as_uri() if as_directory else server.url + name
    assert model.pretrained_cfg["source"] == expected_source
    assert model.pretrained_cfg["url"].startswith("https://dl.fbaipublicfiles.com/")  # the published address
    assert cached_names(torch_home) == ([] if as_directory else [name])  # a directory's file is read where it is
    torch.testing.assert_close(model(X), reference(resnet18_checkpoint)(X), rtol=0, atol=0)


def test_mirror_file_is_hash_checked_against_the_registry(server, resnet18_checkpoint, monkeypatch, torch_home):
    name = WEIGHTS["resnet18_ssl"].file_name
    server.serve(resnet18_checkpoint, name)  # the right name, the wrong contents
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", server.url)
    with pytest.raises(CheckpointError, match=f"mismatch for {server.url}{name}: expected .*d92f0530"):
        create_model("resnet18_ssl")
    assert cached_names(torch_home) == []


def test_mirror_that_is_not_a_url(monkeypatch):
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", "ftp://mirror/")
    with pytest.raises(ValueError, match="_MIRROR='ftp://mirror/' .*only http://, https:// and file:// URLs"):
        create_model("resnet18_ssl")


def test_missing_published_file_suggests_the_mirror(server, monkeypatch):
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", server.url)
    with pytest.raises(CheckpointError, match="HTTP 404.*set SEMI_SUPERVISED_WEIGHTS_MIRROR"):
        create_model("resnet18_ssl")


def test_new_head_keeps_the_pretrained_backbone(resnet18_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        model = create_model("resnet18_ssl", weights=resnet18_checkpoint, num_classes=10)
    assert "new, randomly initialised 10-class head" in caplog.text
    assert model.pretrained_cfg["head"] == "new"
    full = reference(resnet18_checkpoint)
    assert model.fc.weight.shape == (10, 512) and not model.fc.weight.is_meta
    assert torch.equal(model.layer4[1].conv2.weight, full.layer4[1].conv2.weight)
    full.fc = model.fc
    torch.testing.assert_close(model(X), full(X), rtol=0, atol=0)


def test_pooled_features(resnet18_checkpoint):
    model = create_model("resnet18_ssl", weights=resnet18_checkpoint, num_classes=0)
    full = reference(resnet18_checkpoint)
    full.fc = torch.nn.Identity()
    features = model(X)
    assert features.shape == (2, 512) and model.pretrained_cfg["head"] is None
    torch.testing.assert_close(features, full(X), rtol=0, atol=0)


def test_pretrained_features_only_equal_the_full_models_stages(resnet18_checkpoint):
    model = create_model("resnet18_ssl", weights=resnet18_checkpoint, features_only=True, out_indices=(1, 2, 3))
    full, seen = reference(resnet18_checkpoint), {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(full, name).register_forward_hook(lambda m, i, out, name=name: seen.setdefault(name, out))
    full(X)
    features = model(X)
    assert len(features) == 3 and not hasattr(model, "layer4")
    for feature, name in zip(features, ("layer1", "layer2", "layer3")):
        torch.testing.assert_close(feature, seen[name], rtol=0, atol=0)


def test_hash_prefix_follows_torch_hub_convention():
    assert hash_prefix("semi_supervised_resnet18-d92f0530.pth") == "d92f0530"
    assert hash_prefix("https://host/a-b/semi_weakly_supervised_resnet50-16a12f1b.pth") == "16a12f1b"
    assert hash_prefix("finetuned.pth") is None and hash_prefix("model-v2.pth") is None
    assert all(hash_prefix(w.url) == w.hash_prefix for w in WEIGHTS.values())


class FrozenBatchNorm2d(torch.nn.Module):
    """BatchNorm with fixed statistics and no step counter, as detection backbones use."""

    def __init__(self, n):
        super().__init__()
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), fill))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def test_frozen_batchnorm_backbone_loads_the_checkpoint(resnet18_checkpoint):
    model = create_model("resnet18_ssl", weights=resnet18_checkpoint, norm_layer=FrozenBatchNorm2d)
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d) and not list(model.layer1[0].bn1.parameters())
    torch.testing.assert_close(model(X), reference(resnet18_checkpoint)(X), rtol=1e-4, atol=1e-4)
