"""Model names, Hub repo ids and local checkpoints -> cached sam_mlx files, against a fake Hub.

The Hub is not reachable here, so ``huggingface_hub.hf_hub_download`` / ``list_repo_files``
are replaced by a fake serving small random checkpoints made in tmp_path: a transformers
``SamModel`` (the facebook/sam-vit-* layout) and a Meta-format ViT ``.pth``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.errors as hf_errors
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import sam_mlx
from reference import build_reference_sam
from sam_mlx.checkpoints import hub
from sam_mlx.checkpoints.load import FORMAT_VERSION, CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{'hf': transformers model.safetensors, 'meta': Meta-format .pth}, small random weights."""
    folder = tmp_path_factory.mktemp("checkpoints")
    meta = folder / "sam_tiny.pth"
    torch.save(build_reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict(), meta)
    import transformers
    torch.manual_seed(0)
    vision = transformers.SamVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          global_attn_indexes=[1], window_size=14)
    transformers.SamModel(transformers.SamConfig(vision_config=vision.to_dict())).save_pretrained(folder / "hf")
    return {"hf": folder / "hf" / "model.safetensors", "meta": meta}


def _http_error(cls: type, status: int, url: str) -> Exception:
    """huggingface_hub's HTTP errors need a response object of its HTTP library."""
    models = importlib.import_module(hf_errors.Response.__module__)
    return cls(f"{status} for {url}", response=hf_errors.Response(status, request=models.Request("GET", url)))


class FakeHub:
    """Serves ``files[(repo, filename)]`` like hf_hub_download, keeping a fake HF cache of what it served."""

    def __init__(self, root: Path, files: dict[tuple[str, str], Path], reachable: bool = True):
        self.root, self.files, self.reachable = root, files, reachable
        self.downloads: list[tuple[str, str]] = []
        self.local_only_calls = 0

    def hf_hub_download(self, repo_id: str, filename: str, *, local_files_only: bool = False, **_) -> str:
        cached = self.root / repo_id / filename
        if local_files_only:
            self.local_only_calls += 1
            if cached.is_file():
                return str(cached)
            raise hf_errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")
        if not self.reachable:
            raise hf_errors.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        if not any(repo == repo_id for repo, _ in self.files):
            raise _http_error(hf_errors.RepositoryNotFoundError, 404, f"https://huggingface.co/{repo_id}")
        if (repo_id, filename) not in self.files:
            raise hf_errors.EntryNotFoundError(f"{filename} not found in {repo_id}")
        self.downloads.append((repo_id, filename))
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.files[repo_id, filename], cached)
        return str(cached)

    def list_repo_files(self, repo_id: str, **_) -> list[str]:
        return sorted(["README.md", "config.json"] + [f for repo, f in self.files if repo == repo_id])


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty sam_mlx cache (also as $SAM_MLX_CACHE), online."""
    monkeypatch.setenv("SAM_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def install(monkeypatch, tmp_path: Path, files: dict[tuple[str, str], Path], reachable: bool = True) -> FakeHub:
    """The fake Hub in place of huggingface_hub's client; its reachability is what sam_mlx's check finds."""
    fake = FakeHub(tmp_path / "hf_cache", files, reachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(hub, "hub_reachable", lambda: fake.reachable)
    return fake


def same_weights(a, b) -> bool:
    wa, wb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return wa.keys() == wb.keys() and all(mx.array_equal(wa[k], wb[k]).item() for k in wa)


def cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SAM_MLX_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.default_cache_dir() == tmp_path / "hf" / "sam_mlx"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.default_cache_dir() == tmp_path / "xdg" / "huggingface" / "sam_mlx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.default_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "sam_mlx"
    monkeypatch.setenv("SAM_MLX_CACHE", str(tmp_path / "env"))
    assert hub.default_cache_dir() == tmp_path / "env"
    assert hub.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_model_name_downloads_converts_once_then_loads_offline(checkpoints, cache, monkeypatch, tmp_path):
    fake = install(monkeypatch, tmp_path, {("facebook/sam-vit-base", "model.safetensors"): checkpoints["hf"]})
    path = hub.resolve_checkpoint("sam-vit-base")
    assert path == cache / "hub" / "facebook--sam-vit-base" / f"{hub.code_version()}.safetensors"
    assert fake.downloads == [("facebook/sam-vit-base", "model.safetensors")]
    assert same_weights(sam_mlx.load("sam-vit-base"), load_checkpoint(checkpoints["hf"]))
    # Cached: the alias, and offline mode, neither download nor convert again.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "load_checkpoint", lambda *_: pytest.fail("converted twice"))
    assert hub.resolve_checkpoint("vit_b") == path
    assert len(fake.downloads) == 1 and fake.local_only_calls == 0


def test_cache_dir_argument(checkpoints, cache, monkeypatch, tmp_path):
    install(monkeypatch, tmp_path, {("facebook/sam-vit-large", "model.safetensors"): checkpoints["hf"]})
    path = hub.resolve_checkpoint("vit_l", cache_dir=tmp_path / "elsewhere")
    assert path.parent.parent == tmp_path / "elsewhere" / "hub" and not cache.exists()


def test_repo_without_model_safetensors_uses_its_checkpoint(checkpoints, cache, monkeypatch, tmp_path):
    fake = install(monkeypatch, tmp_path, {("someone/tiny-sam", "weights/sam_tiny.pth"): checkpoints["meta"]})
    path = hub.resolve_checkpoint("someone/tiny-sam")
    assert fake.downloads == [("someone/tiny-sam", "weights/sam_tiny.pth")]
    assert same_weights(load_checkpoint(path), load_checkpoint(checkpoints["meta"]))


def test_repo_with_several_checkpoints_needs_a_file_name(checkpoints, cache, monkeypatch, tmp_path):
    files = {("someone/sams", "a.pth"): checkpoints["meta"], ("someone/sams", "b.pth"): checkpoints["meta"]}
    install(monkeypatch, tmp_path, files)
    with pytest.raises(hub.HubError, match=r"several \.pth checkpoints \(a\.pth, b\.pth\)"):
        hub.resolve_checkpoint("someone/sams")
    path = hub.resolve_checkpoint("someone/sams:b.pth")
    assert path.parent == cache / "hub" / "someone--sams--b.pth"
    with pytest.raises(hub.HubError, match="has no file c.pth"):
        hub.resolve_checkpoint("someone/sams:c.pth")


def test_unknown_repo(cache, monkeypatch, tmp_path):
    install(monkeypatch, tmp_path, {})
    # The login hint holds for every allowed huggingface_hub: `hf` came in 0.34, `huggingface-cli` went in 1.0.
    message = (r"no Hub repo nobody/nothing .*`hf auth login`, "
               r"or `huggingface-cli login` with huggingface_hub older than 0\.34")
    with pytest.raises(hub.HubError, match=message):
        hub.resolve_checkpoint("nobody/nothing")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_not_cached_without_hub_says_what_to_download_and_where(checkpoints, cache, monkeypatch, tmp_path, offline):
    fake = install(monkeypatch, tmp_path, {("facebook/sam-vit-huge", "model.safetensors"): checkpoints["hf"]},
                   reachable=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    drop_in = cache / "downloads" / "facebook--sam-vit-huge"
    with pytest.raises(hub.HubError) as info:
        hub.resolve_checkpoint("sam-vit-huge")
    message = str(info.value)
    assert ("HF_HUB_OFFLINE=1" if offline else "could not be reached") in message
    assert "https://huggingface.co/facebook/sam-vit-huge/resolve/main/model.safetensors" in message
    assert "`hf download facebook/sam-vit-huge model.safetensors`; `huggingface-cli download facebook/sam-vit-huge " \
           "model.safetensors` with huggingface_hub older than 0.34" in message
    assert str(drop_in) in message
    assert fake.downloads == [] and fake.local_only_calls == 1  # only huggingface_hub's cache was looked in
    # Following the advice works with the Hub still out of reach.
    drop_in.mkdir(parents=True)
    shutil.copyfile(checkpoints["hf"], drop_in / "model.safetensors")
    assert same_weights(load_checkpoint(hub.resolve_checkpoint("sam-vit-huge")), load_checkpoint(checkpoints["hf"]))


def test_offline_uses_huggingface_cache(checkpoints, cache, monkeypatch, tmp_path):
    """A file already in huggingface_hub's own cache (e.g. from `hf download`) is converted offline."""
    fake = install(monkeypatch, tmp_path, {})
    (fake.root / "facebook/sam-vit-base").mkdir(parents=True)
    shutil.copyfile(checkpoints["hf"], fake.root / "facebook/sam-vit-base/model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_checkpoint("sam-vit-base").is_file() and fake.local_only_calls == 1


def test_local_checkpoint_converted_once_keyed_by_file(checkpoints, cache, monkeypatch, tmp_path):
    source = tmp_path / "sam_tiny.pth"
    shutil.copyfile(checkpoints["meta"], source)
    first = hub.resolve_checkpoint(source)
    assert first.parent.parent == cache / "local" and first.parent.name.startswith("sam_tiny-")
    assert same_weights(load_checkpoint(first), load_checkpoint(source))
    real_load = hub.load_checkpoint
    monkeypatch.setattr(hub, "load_checkpoint", lambda *_: pytest.fail("converted twice"))
    assert hub.resolve_checkpoint(str(source)) == first
    # A changed file (new mtime) is converted again, under a new key.
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr(hub, "load_checkpoint", real_load)
    second = hub.resolve_checkpoint(source)
    assert second != first and second.is_file()
    assert not first.exists()  # the stale conversion is dropped


def test_conversions_by_other_sam_mlx_code_are_not_reused(checkpoints, cache, monkeypatch, tmp_path):
    """A converter change (new release, or code being edited) must not load an old conversion."""
    install(monkeypatch, tmp_path, {("facebook/sam-vit-base", "model.safetensors"): checkpoints["hf"]})
    old = [hub.resolve_checkpoint(name) for name in ("sam-vit-base", checkpoints["meta"])]
    monkeypatch.setattr(hub, "code_version", lambda: "0123456789abcdef")
    new = [hub.resolve_checkpoint(name) for name in ("sam-vit-base", checkpoints["meta"])]
    for before, after in zip(old, new):
        assert after != before and after.parent == before.parent and not before.exists()
    assert new[0].name == "0123456789abcdef.safetensors"


def test_code_version_hashes_every_sub_package(monkeypatch, tmp_path):
    """An edit to any module of the package, in a sub-package too, changes the cache key."""
    package = Path(hub.__file__).resolve().parents[1]
    copy = tmp_path / "sam_mlx"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(hub, "__file__", str(copy / "checkpoints" / "hub.py"))
    versions = []
    for edited in (None, "modeling/mask_decoder.py", "fast/sam.py", "ops/attention.py", "config.py"):
        if edited:
            (copy / edited).write_text((copy / edited).read_text() + "\n# edited\n")
        hub.code_version.cache_clear()
        versions.append(hub.code_version())
    hub.code_version.cache_clear()
    assert len(set(versions)) == len(versions)


def test_cached_file_of_another_format_version_is_converted_again(checkpoints, cache, monkeypatch, tmp_path):
    """A cached conversion under the current key but in another format version (say, written by a sam_mlx whose
    hash collided) is not loaded as it is: it is converted again in place."""
    install(monkeypatch, tmp_path, {("facebook/sam-vit-base", "model.safetensors"): checkpoints["hf"]})
    for name in ("sam-vit-base", checkpoints["meta"]):
        target = hub.resolve_checkpoint(name)
        arrays, metadata = mx.load(str(target), return_metadata=True)
        mx.save_safetensors(str(target), arrays, metadata={**metadata, "format_version": "1"})
        assert hub.resolve_checkpoint(name) == target
        assert mx.load(str(target), return_metadata=True)[1]["format_version"] == FORMAT_VERSION
        load_checkpoint(target)


def test_local_sam_mlx_file_and_folder(checkpoints, cache, tmp_path):
    converted = hub.resolve_checkpoint(checkpoints["meta"])
    assert hub.resolve_checkpoint(converted) == converted  # already sam_mlx: used as it is
    folder_result = hub.resolve_checkpoint(checkpoints["hf"].parent)  # a save_pretrained folder
    assert same_weights(load_checkpoint(folder_result), load_checkpoint(checkpoints["hf"]))


def test_cache_write_is_atomic(checkpoints, cache, monkeypatch, tmp_path):
    real_save = mx.save_safetensors

    def crash_midway(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", crash_midway)
    fake = install(monkeypatch, tmp_path, {("facebook/sam-vit-base", "model.safetensors"): checkpoints["hf"]})
    # The failed cache write leaves nothing behind; the unconverted file is still usable.
    for name, source in (("sam-vit-base", fake.root / "facebook/sam-vit-base/model.safetensors"),
                         (checkpoints["meta"], checkpoints["meta"])):
        with pytest.warns(UserWarning, match=r"could not cache .*disk full"):
            assert hub.resolve_checkpoint(name) == source
    assert cache_files(cache) == []
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    assert hub.resolve_checkpoint("sam-vit-base").is_file()


def test_failed_conversion_leaves_no_file(cache, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="broken.pth"):
        hub.resolve_checkpoint(bad)
    assert cache_files(cache) == []


@pytest.mark.parametrize(
    "name, message",
    [("weights/missing.pth", "checkpoint not found: weights/missing.pth"), ("./x/y", "checkpoint not found"),
     ("no-such-model", "sam-vit-base")],
)
def test_missing_path_is_not_a_hub_repo(cache, monkeypatch, tmp_path, name, message):
    install(monkeypatch, tmp_path, {})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *_, **__: pytest.fail("asked the Hub"))
    with pytest.raises(FileNotFoundError, match=message):
        hub.resolve_checkpoint(name)


def test_folder_with_no_checkpoint(cache, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(hub.HubError, match="has no checkpoint"):
        hub.resolve_checkpoint(tmp_path)


def test_cache_is_lossless_and_compact(checkpoints, cache, tmp_path):
    """float32 weights are cached as float32, float16 ones as float16: exact either way."""
    half = {k: v.half() for k, v in torch.load(checkpoints["meta"]).items()}
    torch.save(half, tmp_path / "half.pth")
    for source, dtype in ((checkpoints["meta"], mx.float32), (tmp_path / "half.pth", mx.float16)):
        stored = mx.load(str(hub.resolve_checkpoint(source)))
        assert {v.dtype for v in stored.values()} == {dtype}
        assert same_weights(load_checkpoint(hub.resolve_checkpoint(source)), load_checkpoint(source))
    np.testing.assert_array_equal(np.array(stored["mask_decoder.iou_token"]), half["mask_decoder.iou_token.weight"])


def test_other_repo_offline_drop_in(checkpoints, cache, monkeypatch, tmp_path):
    """A repo without a known file name: the hint points at the repo's files; a dropped-in .pth is used."""
    install(monkeypatch, tmp_path, {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match=r"huggingface.co/someone/tiny-sam/tree/main and put it in"):
        hub.resolve_checkpoint("someone/tiny-sam")
    drop_in = cache / "downloads" / "someone--tiny-sam"
    drop_in.mkdir(parents=True)
    shutil.copyfile(checkpoints["meta"], drop_in / "sam_tiny.pth")
    converted = load_checkpoint(hub.resolve_checkpoint("someone/tiny-sam"))
    assert same_weights(converted, load_checkpoint(checkpoints["meta"]))


def test_network_failure_while_listing(cache, monkeypatch, tmp_path):
    fake = install(monkeypatch, tmp_path, {("someone/tiny-sam", "sam_tiny.pth"): tmp_path / "unused"})

    def unreachable(*_, **__):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    with pytest.raises(hub.HubError, match=r"downloading someone/tiny-sam failed \(\[Errno -2\] Name or service"):
        hub.resolve_checkpoint("someone/tiny-sam")
    assert fake.downloads == []


def test_mobile_sam_name(checkpoints, cache, monkeypatch, tmp_path):
    """``mobile_sam`` is MobileSAM's official checkpoint in the dhkim2810/MobileSAM Hub repo."""
    fake = install(monkeypatch, tmp_path, {("dhkim2810/MobileSAM", "mobile_sam.pt"): checkpoints["meta"]})
    path = hub.resolve_checkpoint("mobile_sam")
    assert fake.downloads == [("dhkim2810/MobileSAM", "mobile_sam.pt")]
    assert path.parent == cache / "hub" / "dhkim2810--MobileSAM"
    assert same_weights(load_checkpoint(path), load_checkpoint(checkpoints["meta"]))


@pytest.fixture
def endpoint(monkeypatch):
    """Point the Hub endpoint at a local address: ``endpoint(port)``; no proxy variables."""
    for name in hub._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    return lambda port: monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def test_hub_reachable_is_a_quick_connection(endpoint, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        endpoint(port)
        assert hub.hub_reachable()
    # closed now: refused at once
    start = time.perf_counter()
    assert not hub.hub_reachable()
    assert time.perf_counter() - start < 1.0
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a proxy is trusted to know the way
    assert hub.hub_reachable()


def test_unreachable_hub_fails_at_once(cache, endpoint, monkeypatch, tmp_path):
    """Offline without HF_HUB_OFFLINE, a Hub name fails with the drop-in advice without the client's retries."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
    endpoint(port)
    calls = []

    def download(repo_id, filename, *, local_files_only=False, **_):
        calls.append(local_files_only)
        if not local_files_only:
            time.sleep(30)  # what retrying against an unreachable Hub costs
        raise hf_errors.LocalEntryNotFoundError("not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    start = time.perf_counter()
    with pytest.raises(hub.HubError, match=r"dhkim2810/MobileSAM is not cached and the Hugging Face Hub could not be "
                                           r"reached\. Download https://huggingface\.co/dhkim2810/MobileSAM/resolve/"
                                           r"main/mobile_sam\.pt"):
        hub.resolve_checkpoint("mobile_sam")
    assert calls == [True] and time.perf_counter() - start < 5.0


@pytest.fixture(scope="module")
def family_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Small random files in the formats of the SAM family's repos: a SamHQModel model.safetensors, Light HQ-SAM's
    .pth (TinyViT), transformers' pytorch_model.bin (MedSAM's repo)."""
    import transformers
    from safetensors.torch import load_file as load_torch_safetensors

    from reference import build_reference_hq_sam

    folder = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1], window_size=14)
    hq = transformers.SamHQModel(transformers.SamHQConfig(vision_config=vision, mask_decoder_config=dict(vit_dim=64)))
    hq.save_pretrained(folder / "hq")
    torch.save(build_reference_hq_sam("tiny_vit").state_dict(), folder / "sam_hq_vit_tiny.pth")
    torch.save(load_torch_safetensors(str(checkpoints["hf"])), folder / "pytorch_model.bin")
    return {"hq": folder / "hq" / "model.safetensors", "hq_tiny": folder / "sam_hq_vit_tiny.pth",
            "hf": checkpoints["hf"], "bin": folder / "pytorch_model.bin"}


@pytest.mark.parametrize("name, repo, filename, served, encoder, hq", [
    ("sam-hq-vit-base", "syscv-community/sam-hq-vit-base", "model.safetensors", "hq", "vit", True),
    ("sam-hq-vit-huge", "syscv-community/sam-hq-vit-huge", "model.safetensors", "hq", "vit", True),
    ("sam-hq-vit-tiny", "lkeab/hq-sam", "sam_hq_vit_tiny.pth", "hq_tiny", "tiny_vit", True),
    ("slimsam-50", "nielsr/slimsam-50-uniform", "model.safetensors", "hf", "vit", False),
    ("slimsam-77", "nielsr/slimsam-77-uniform", "model.safetensors", "hf", "vit", False),
    ("medsam", "wanglab/medsam-vit-base", "pytorch_model.bin", "bin", "vit", False),
])
def test_family_names(family_checkpoints, cache, monkeypatch, tmp_path, name, repo, filename, served, encoder, hq):
    fake = install(monkeypatch, tmp_path, {(repo, filename): family_checkpoints[served]})
    model = sam_mlx.load(name)
    assert fake.downloads == [(repo, filename)]
    assert (model.config.encoder.kind, model.config.hq) == (encoder, hq)
    assert same_weights(model, load_checkpoint(family_checkpoints[served]))
