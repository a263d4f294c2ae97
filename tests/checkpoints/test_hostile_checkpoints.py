"""Crafted checkpoints are refused with one CheckpointError naming the file, in bounded memory, and never
alter sam_mlx, crash or load garbage.

Every file is made here: a small ``.pth`` writer (``write_pth``) lays out tensor records, storages and
pickles exactly as ``torch.save`` does, or with the faults under test. A few cases that crashed or ate
memory are run as child processes (``sam-mlx convert``) so a regression fails the test, not the run.
"""

from __future__ import annotations

import collections
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import sam_mlx
from helpers import MOBILE_SAM, ROOT
from reference import build_reference_sam
from sam_mlx import CheckpointError
from sam_mlx.checkpoints import torch_pickle
from sam_mlx.checkpoints.load import load_checkpoint, save_model

_KINDS = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
          np.dtype("float64"): "DoubleStorage"}


@dataclass(frozen=True)
class Record:
    """A tensor record of a crafted .pth: a view (offset, shape, strides in elements) of storage ``key``."""

    key: str
    kind: str
    numel: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageRef:
    def __init__(self, record: Record):
        self.record = record


class _Pickler(pickle.Pickler):
    """Pickles {name: Record} as torch.save does: tensors rebuilt by torch._utils._rebuild_tensor_v2 over
    persistent storage references."""

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            r = obj.record
            return ("storage", getattr(torch, r.kind), r.key, "cpu", r.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Record):
            return torch._utils._rebuild_tensor_v2, (_StorageRef(obj), obj.offset, obj.size, obj.stride, False,
                                                      collections.OrderedDict())
        return NotImplemented


def state_pickle(records: dict[str, Record]) -> bytes:
    import io

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(collections.OrderedDict(records))
    return buffer.getvalue()


def write_pth(path: Path, records: dict[str, Record], storages: dict[str, bytes], pickle_bytes: bytes | None = None,
              compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", state_pickle(records) if pickle_bytes is None else pickle_bytes)
        archive.writestr("archive/version", "3\n")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def contiguous(key: str, array: np.ndarray) -> Record:
    strides = tuple(s // array.itemsize for s in array.strides)
    return Record(key, _KINDS[array.dtype], array.size, 0, array.shape, strides)


@pytest.fixture(scope="module")
def mobile_sam() -> tuple[dict[str, Record], dict[str, bytes]]:
    """The real MobileSAM checkpoint as records and storages (one storage per tensor), to tamper with."""
    arrays = {name: np.ascontiguousarray(t) for name, t in torch_pickle.read_torch_checkpoint(MOBILE_SAM).items()}
    records = {name: contiguous(str(i), a) for i, (name, a) in enumerate(arrays.items())}
    storages = {records[name].key: a.tobytes() for name, a in arrays.items()}
    return records, storages


def test_the_writer_makes_loadable_checkpoints(mobile_sam, tmp_path):
    """The crafted-file writer itself: MobileSAM rewritten by it loads as the original does."""
    path = write_pth(tmp_path / "copy.pth", *mobile_sam)
    assert torch.load(path, weights_only=True).keys() == mobile_sam[0].keys()
    ours, real = load_checkpoint(path), load_checkpoint(MOBILE_SAM)
    from mlx.utils import tree_flatten

    for (name, a), (_, b) in zip(tree_flatten(ours.parameters()), tree_flatten(real.parameters()), strict=True):
        assert mx.array_equal(a, b).item(), name


def convert(path: Path, tmp_path: Path, limit_mb: int | None = None) -> subprocess.CompletedProcess:
    """``sam-mlx convert path`` in a child process (optionally under an address-space limit)."""
    script = "import sys; from sam_mlx.cli import main; sys.exit(main(sys.argv[1:]))"
    if limit_mb:
        script = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_mb << 20}, {limit_mb << 20}))\n"
                  + script)
    out = tmp_path / "out.safetensors"
    return subprocess.run([sys.executable, "-c", script, "convert", str(path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, f"exit {result.returncode}: {result.stderr[-1500:]}"
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "unexpected" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------ strides
@pytest.mark.parametrize("offset, stride", [(0, (256, -1)), (255, (256, -1)), (0, (-256, 1)), (1023, (-256, -1)),
                                            (-1, (256, 1))],
                         ids=["negative-inner", "negative-inner-shifted", "negative-outer", "both-negative", "offset"])
def test_strides_of_any_sign_must_stay_inside_the_storage(mobile_sam, tmp_path, offset, stride):
    """MobileSAM with one weight's view changed: refused unless every element it addresses is in its storage.
    The reversed views at offsets 255 and 1023 stay inside: they load, with the reversed values."""
    records, storages = mobile_sam
    name = "mask_decoder.mask_tokens.weight"  # 4 x 256
    records = dict(records, **{name: replace(records[name], offset=offset, stride=stride)})
    path = write_pth(tmp_path / "strided.pth", records, storages)
    inside = offset in (255, 1023)
    result = convert(path, tmp_path)
    if inside:
        assert result.returncode == 0, result.stderr
        original = np.frombuffer(storages[records[name].key], np.float32).reshape(4, 256)
        expected = original[:, ::-1] if stride == (256, -1) else original[::-1, ::-1]
        saved = mx.load(str(tmp_path / "out.safetensors"))["mask_decoder.mask_tokens"]
        np.testing.assert_array_equal(np.array(saved), expected)
    else:
        assert_refused(result, "strided.pth", name, "outside its storage")


def test_huge_negative_stride_does_not_crash(tmp_path):
    path = write_pth(tmp_path / "crash.pth", {"w": Record("0", "FloatStorage", 4, 0, (4, 4), (1 << 40, -(1 << 41)))},
                     {"0": bytes(16)})
    assert_refused(convert(path, tmp_path), "crash.pth", "outside its storage")


# ------------------------------------------------------------------ storage types and sizes
@pytest.mark.parametrize("kind", ["HalfStorage", "IntStorage", "BoolStorage", "BFloat16Storage", "LongStorage"])
def test_storage_type_must_match_its_bytes(mobile_sam, tmp_path, kind):
    """A float32 weight's storage relabelled: its byte length contradicts the type, or its values are not floats."""
    records, storages = mobile_sam
    name = "mask_decoder.iou_prediction_head.layers.0.weight"
    records = dict(records, **{name: replace(records[name], kind=kind)})
    path = write_pth(tmp_path / f"{kind}.pth", records, storages)
    with pytest.raises(CheckpointError, match=rf"{kind}\.pth: .*({records[name].key!r} holds|{name} holds {kind})"):
        load_checkpoint(path)


def test_safetensors_weights_must_be_floats(tmp_path):
    model = sam_mlx.load(str(MOBILE_SAM))
    path = save_model(model, tmp_path / "model.safetensors")
    arrays, metadata = mx.load(str(path), return_metadata=True)
    arrays["mask_decoder.iou_token"] = arrays["mask_decoder.iou_token"].astype(mx.int32)
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight mask_decoder\.iou_token holds I32 values"):
        load_checkpoint(path)


def peak_rss_of_loading(path: Path) -> tuple[str, float]:
    """Load ``path`` in a child process: (its one-line error, the MB its peak RSS grew by while loading)."""
    script = textwrap.dedent(f"""
        import sam_mlx
        from pathlib import Path
        def rss():
            status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
            return int(status["VmHWM"].split()[0]) / 1024
        before = rss()
        try:
            sam_mlx.load_checkpoint({str(path)!r})
            message = "loaded"
        except Exception as exc:
            message = f"{{type(exc).__name__}}: {{exc}}"
        print(message.replace("\\n", " "))
        print(rss() - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    message, grown = result.stdout.strip().splitlines()[-2:]
    return message, float(grown)


def test_tiny_file_cannot_claim_gigabytes(mobile_sam, tmp_path):
    """An extra weight of 20000 x 20000 floats from one stored float (strides 0): 1.6 GB if materialised."""
    records, storages = mobile_sam
    records = dict(records, **{"mask_decoder.junk": Record("junk", "FloatStorage", 1, 0, (20000, 20000), (0, 0))})
    path = write_pth(tmp_path / "broadcast.pth", records, dict(storages, junk=bytes(4)))
    message, grown = peak_rss_of_loading(path)
    assert message.startswith("CheckpointError: ") and "broadcast.pth" in message and "mask_decoder.junk" in message
    assert grown < 300, f"loading grew the peak RSS by {grown:.0f} MB"


def test_zip_bomb_is_refused_before_it_is_inflated(mobile_sam, tmp_path):
    """A compressed 1 GB storage of zeros (~1 MB in the file) behind one of MobileSAM's small weights."""
    records, storages = mobile_sam
    name = "mask_decoder.iou_token.weight"
    numel = 1 << 28
    records = dict(records, **{name: replace(records[name], key="bomb", numel=numel)})
    path = tmp_path / "bomb.pth"
    write_pth(path, records, storages, compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("archive/data/bomb", "w", force_zip64=True) as entry:
        zeros = bytes(1 << 24)
        for _ in range(numel * 4 // len(zeros)):
            entry.write(zeros)
    assert zipfile.ZipFile(path).getinfo("archive/data/bomb").compress_size < 5 << 20
    message, grown = peak_rss_of_loading(path)
    assert message.startswith("CheckpointError: ") and "bomb.pth" in message and "'bomb'" in message, message
    assert grown < 300, f"loading grew the peak RSS by {grown:.0f} MB"


def test_a_model_larger_than_the_machine_is_refused_unread(tmp_path):
    """A ViT whose declared position encoding would take 10^13 floats: refused from the shapes alone."""
    state = build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict()
    records, storages = {}, {}
    for i, (name, tensor) in enumerate(state.items()):
        array = tensor.numpy()
        records[name], storages[str(i)] = contiguous(str(i), array), array.tobytes()
    pos = records["image_encoder.pos_embed"]  # 1 x 64 x 64 x 32; blocks.1 is global, so its table must match
    records["image_encoder.pos_embed"] = replace(pos, size=(1, 60000, 60000, 32))
    records["image_encoder.pos_embed"] = Record("big", "FloatStorage", 60000 * 60000 * 32, 0, (1, 60000, 60000, 32),
                                                (60000 * 60000 * 32, 60000 * 32, 32, 1))
    storages["big"] = b""  # declared, not present: nothing may try to read it
    for axis in ("h", "w"):
        key = f"image_encoder.blocks.1.attn.rel_pos_{axis}"
        records[key] = replace(records[key], size=(2 * 60000 - 1, 16), numel=(2 * 60000 - 1) * 16)
        storages[records[key].key] = bytes((2 * 60000 - 1) * 16 * 4)
    path = write_pth(tmp_path / "enormous.pth", records, storages)
    with pytest.raises(CheckpointError, match=r"enormous\.pth: .*(more than this machine's memory|storage 'big')"):
        load_checkpoint(path)


# ------------------------------------------------------------------ the unpickler
def _opcodes(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def test_build_cannot_alter_the_whitelisted_functions(tmp_path):
    """BUILD with a slot state on ``_rebuild_tensor_v2`` itself would rename it or change its defaults."""
    rebuild = torch_pickle._rebuild_tensor
    before = (rebuild.__name__, rebuild.__defaults__)
    for attribute, value in (("__name__", _text("hacked")), ("__defaults__", b"N\x85")):
        payload = _opcodes(b"ctorch._utils\n_rebuild_tensor_v2\n", b"N}", _text(attribute), value, b"s\x86b0}")
        path = write_pth(tmp_path / f"build{attribute}.pth", {}, {}, pickle_bytes=payload)
        with pytest.raises(CheckpointError, match=rf"build{attribute}\.pth: .*sets the state"):
            load_checkpoint(path)
        assert (rebuild.__name__, rebuild.__defaults__) == before


def test_torch_state_dict_metadata_is_still_accepted(tmp_path):
    """torch.save gives a state dict's OrderedDict its ``_metadata`` by BUILD: that one is allowed."""
    state = build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict()
    assert hasattr(state, "_metadata")
    torch.save(state, tmp_path / "meta.pth")
    assert "mask_decoder.iou_token.weight" in torch_pickle.read_torch_checkpoint(tmp_path / "meta.pth")


def _zip_with_patched_entry(path: Path, flag_bits: int = 0, method: int | None = None) -> Path:
    """A one-entry .pth whose data.pkl headers say encrypted (``flag_bits``) or a compression ``method``."""
    write_pth(path, {}, {}, pickle_bytes=_opcodes(b"}"))
    data = bytearray(path.read_bytes())
    for signature, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(signature)
        data[at + flags_at : at + flags_at + 2] = struct.pack("<H", flag_bits)
        if method is not None:
            data[at + method_at : at + method_at + 2] = struct.pack("<H", method)
    path.write_bytes(bytes(data))
    return path


def _nested(depth: int) -> bytes:
    return _opcodes(*([b"}" + _text("a")] * depth), b"}", b"s" * depth)


@pytest.mark.parametrize("case", ["recursion", "unknown-opcode", "bad-utf8", "compression", "encrypted", "overflow",
                                  "bad-size-type", "bad-storage-record", "truncated-pickle", "list"])
def test_every_pickle_or_zip_fault_is_one_checkpoint_error(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    if case == "compression":
        _zip_with_patched_entry(path, method=99)
    elif case == "encrypted":
        _zip_with_patched_entry(path, flag_bits=1)
    else:
        if case == "overflow":
            records = {"w": Record("0", "FloatStorage", 4, 0, (1 << 70, 1 << 70), (1, 1))}
            payload = state_pickle(records)
        elif case == "bad-size-type":
            payload = state_pickle({"w": Record("0", "FloatStorage", 4, 0, ("4",), (1,))})
        else:
            payload = {
                "recursion": _nested(50_000),
                "unknown-opcode": _opcodes(b"\xff"),
                "bad-utf8": b"\x80\x02X\x02\x00\x00\x00\xff\xfe.",
                "bad-storage-record": _opcodes(b"}", _text("w"), b"N", b"Q", b"s"),
                "truncated-pickle": state_pickle({"w": Record("0", "FloatStorage", 4, 0, (4,), (1,))})[:-20],
                "list": _opcodes(b"]"),
            }[case]
        write_pth(path, {}, {"0": bytes(16)}, pickle_bytes=payload)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


# ------------------------------------------------------------------ sam_mlx config values
@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    torch.save(build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict(),
               folder / "tiny.pth")
    return save_model(load_checkpoint(folder / "tiny.pth"), folder / "tiny.safetensors")


@pytest.mark.parametrize("field, value, message", [
    (("encoder", "num_heads"), 0, "ViTConfig.num_heads must be a whole number from 1 to 65536, got 0"),
    (("encoder", "num_heads"), 3, "ViTConfig.num_heads (3) must divide embed_dim (32)"),
    (("encoder", "depth"), "2", "ViTConfig.depth must be a whole number from 1 to 65536, got '2'"),
    (("encoder", "embed_dim"), 32.5, "ViTConfig.embed_dim must be a whole number from 1 to 65536, got 32.5"),
    (("encoder", "global_attention_blocks"), [7], "ViTConfig.global_attention_blocks (7,) must be blocks 0..1"),
    (("encoder", "qkv_bias"), "yes", "ViTConfig.qkv_bias must be true or false, got 'yes'"),
    (("decoder", "transformer_heads"), -8, "PromptDecoderConfig.transformer_heads must be a whole number from 1"),
    (("image_size",), 0, "SamConfig.image_size must be a multiple of 16 from 16 to 16384, got 0"),
    (("image_size",), 2**20, "SamConfig.image_size must be a multiple of 16 from 16 to 16384, got 1048576"),
    (("image_size",), "1024", "SamConfig.image_size must be a multiple of 16 from 16 to 16384, got '1024'"),
])
def test_tampered_config_values_are_named(tiny_vit_file, tmp_path, field, value, message):
    arrays, metadata = mx.load(str(tiny_vit_file), return_metadata=True)
    config = json.loads(metadata["sam_mlx_config"])
    *parents, last = field
    target = config
    for key in parents:
        target = target[key]
    target[last] = value
    path = tmp_path / "tampered.safetensors"
    mx.save_safetensors(str(path), arrays, metadata=dict(metadata, sam_mlx_config=json.dumps(config)))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), str(error.value)
