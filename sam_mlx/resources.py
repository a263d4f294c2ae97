"""How much memory this process may use, to refuse work that cannot fit before it starts."""

from __future__ import annotations

import os
from pathlib import Path


def machine_memory() -> int | None:
    """Bytes this process may still use: the least of physical memory, its cgroup's limit and its address-space
    and data limits (``ulimit -v``/``-d``) less what it already maps; None when none of them is known."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    limits += _cgroup_limits()
    try:
        import resource
    except ImportError:  # Windows
        return min(limits, default=None)
    status = _proc_status()
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (getattr(resource, "RLIMIT_DATA", None), "VmData")):
        if limit is None:
            continue
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(max(soft - status.get(used, 0), 0))
    return min(limits, default=None)


def _cgroup_limits() -> list[int]:
    """The memory limit of this process's cgroup (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``) less its use."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2
            folder = Path("/sys/fs/cgroup") / group.lstrip("/")
            limit_file, usage_file = folder / "memory.max", folder / "memory.current"
        elif "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
            limit_file, usage_file = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip()) if usage_file.exists() else 0
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a v1 huge number: no limit
            found.append(max(int(limit) - usage, 0))
    return found


def _proc_status() -> dict[str, int]:
    """Sizes (bytes) from /proc/self/status, {} where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    sizes = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            sizes[key] = int(parts[0]) * 1024
    return sizes


def format_bytes(count: float) -> str:
    """``count`` bytes as MB, GB or TB for messages."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e6:.2f} MB"


def gpu_working_set() -> int | None:
    """The memory MLX recommends a GPU's working set stay within (Metal's ``recommendedMaxWorkingSetSize``, from
    ``mx.device_info()``), or None when MLX reports none (the CPU)."""
    import mlx.core as mx

    size = mx.device_info().get("max_recommended_working_set_size")
    return int(size) if size else None


def memory_for_encoding(cpu: bool) -> tuple[int | None, str]:
    """(bytes an encoding may use, what that figure is) on the CPU or the GPU: on a GPU the least of MLX's
    recommended working set and this machine's memory, as a GPU allocation past the working set pages out."""
    available = machine_memory()
    working_set = None if cpu else gpu_working_set()
    if working_set is not None and (available is None or working_set <= available):
        return working_set, "the GPU's recommended working set (MLX's device_info)"
    return available, "this machine's memory and process limits"


def check_encoding_fits(config, padded_size: tuple[int, int], cpu: bool) -> None:
    """Raise ValueError, with the estimate and what it is compared with, if encoding at ``padded_size`` would need
    more memory than there is."""
    need = encoding_memory(config, padded_size, cpu)
    available, basis = memory_for_encoding(cpu)
    if available is not None and need > available:
        h, w = padded_size
        how = "the CPU's chunked attention" if cpu else "the GPU's fused attention"
        raise ValueError(f"encoding an image at {w}x{h} would need about {format_bytes(need)} of memory (estimated "
                         f"for {how}), more than the {format_bytes(available)} of {basis}: use a smaller size")


def encoding_memory(config, padded_size: tuple[int, int], cpu: bool = True) -> int:
    """An estimate of the bytes that encoding one image padded to ``padded_size`` (H, W) takes beyond the weights.

    Counted in float32: the image (resized, normalised, padded: ~36 bytes a pixel); for the ViT, each token's
    activations (about 10 widths and 2 MLP widths) and, in global-attention blocks, the per-axis
    relative-position logits (2 x heads x tokens x (rows + columns)), and on a GPU one chunk of the fused
    attention kernel's mask (``ops.attention.GPU_MASK_BYTES``); for TinyViT, its first stage's MBConv activations at
    a quarter of the resolution. Doubled for MLX's buffer cache and copies between row bands, plus 250 MB
    fixed: on the development machine's CPU that lies between the measured growth of the peak RSS while
    encoding and twice it, for MobileSAM and a ViT-B at 256..2048 pixels square (``scripts/encoding_memory.py``).
    """
    h, w = padded_size
    pixels, rows, cols = h * w, h // 16, w // 16
    tokens = rows * cols
    need = 36 * pixels
    encoder = config.encoder
    if encoder.kind == "vit":
        need += 4 * tokens * (10 * encoder.embed_dim + 2 * encoder.mlp_dim)
        if encoder.global_attention_blocks:
            need += 8 * encoder.num_heads * tokens * (rows + cols)
            if not cpu:
                from .ops.attention import GPU_MASK_BYTES

                need += min(2 * encoder.num_heads * tokens * tokens, GPU_MASK_BYTES)
    else:
        dim, expand = encoder.embed_dims[0], encoder.mbconv_expand_ratio
        need += int(4 * (pixels // 16) * dim * (2 + 2 * expand))
    return 2 * need + (250 << 20)
