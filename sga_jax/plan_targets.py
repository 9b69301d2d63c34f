"""What ``sga-jax plan`` compiles for: TPU slices (libtpu), NVIDIA GPUs (the CUDA plugin), or N
simulated CPU devices, each described without the hardware.

* **TPU**: ``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name=...)``
  asks libtpu for a slice's devices (MaxText's ``train_compile.py`` does the same).
* **GPU**: the CUDA PJRT plugin compiles deviceless when it is given a topology
  (``"slices x hosts x devices per host"``) and a ``GpuTargetConfigProto``: the device description
  XLA would otherwise read off the GPU (``--xla_gpu_target_config_filename`` takes the same text).
  :data:`GPU_SPECS` holds the CUDA device properties of an SM 9.0 Hopper part and
  :func:`gpu_target_config` writes the proto's text form; no driver, toolkit or GPU is needed.
* **CPU**: ``jax_num_cpu_devices`` devices of this machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from sga_jax.errors import ConfigError

GB = 10**9


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's datasheet numbers: HBM capacity (bytes), bf16 peak (FLOP/s), HBM bandwidth
    (bytes/s)."""

    name: str
    hbm_bytes: float
    peak_flops: float
    hbm_bandwidth: float
    source: str


# Google Cloud's TPU pages (cloud.google.com/tpu/docs/v5e, /v5p, /v6e; key chip specifications).
CHIPS: dict[str, Chip] = {
    "v5e": Chip("TPU v5e", 16 * GB, 197e12, 819 * GB, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GB, 459e12, 2765 * GB, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GB, 918e12, 1640 * GB, "cloud.google.com/tpu/docs/v6e"),
}

# NVIDIA's datasheets (nvidia.com/en-us/data-center/h100, /h200), SXM parts: dense bf16 tensor-core
# peak (the datasheets' 1,979 TFLOP/s is with 2:4 sparsity), HBM capacity and bandwidth.
GPU_CHIPS: dict[str, Chip] = {
    "h100": Chip("NVIDIA H100 SXM", 80 * GB, 989e12, 3350 * GB, "nvidia.com/en-us/data-center/h100"),
    "h200": Chip("NVIDIA H200 SXM", 141 * GB, 989e12, 4800 * GB, "nvidia.com/en-us/data-center/h200"),
}

# The device description XLA's GPU compiler reads (GpuDeviceInfoProto, xla/stream_executor/
# device_description.proto). H100 and H200 are the same GH100 die at compute capability 9.0 (CUDA
# Programming Guide, "Compute Capabilities", 9.0 column): 132 SMs at 1.98 GHz boost, 128 FP32 lanes,
# 2048 threads and 64 Ki registers per SM, 228 KiB shared memory per SM (227 KiB opt-in per block,
# 48 KiB default), a 50 MiB L2. They differ in HBM only (the datasheets above).
_HOPPER = dict(
    threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
    shared_memory_per_core=228 * 1024, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
    block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
    l2_cache_size=50 * 2**20, clock_rate_ghz=1.98, shared_memory_per_block_optin=227 * 1024,
    registers_per_core_limit=65536, registers_per_block_limit=65536,
)  # fmt: skip
GPU_SPECS: dict[str, dict] = {
    gen: dict(_HOPPER, memory_bandwidth=int(chip.hbm_bandwidth), device_memory_size=int(chip.hbm_bytes))
    for gen, chip in GPU_CHIPS.items()
}
GPU_DEVICE_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
GPUS_PER_HOST = 8  # an HGX board; more GPUs are whole hosts of 8

# Accelerator type -> libtpu topology. v5e-N / v6e-N count chips; v5p-N counts TensorCores, two
# per chip (v5p-128 = 4x4x4 = 64 chips), as Cloud TPU names them. One JAX device per chip.
_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TOPOLOGIES: dict[str, dict[int, str]] = {
    "v5e": _2D,
    "v6e": _2D,
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
            1024: "8x8x8"},
}  # fmt: skip

TPU_EXTRA = 'pip install "sga-jax[tpu]"'
GPU_EXTRA = 'pip install "sga-jax[gpu-aot]"'


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to plan for: ``platform`` "tpu" (a libtpu ``topology``), "gpu" (a CUDA plugin
    ``topology`` of ``gpu`` GPUs) or "cpu" (simulated devices)."""

    text: str
    platform: str
    chips: int
    topology: str | None = None
    chip: Chip | None = None
    gpu: str | None = None


def gpu_topology(n: int) -> str | None:
    """``slices x hosts x GPUs per host`` for n GPUs: one host up to 8, else whole hosts of 8."""
    if n in (1, 2, 4, GPUS_PER_HOST):
        return f"1x1x{n}"
    if n > GPUS_PER_HOST and n % GPUS_PER_HOST == 0:
        return f"1x{n // GPUS_PER_HOST}x{GPUS_PER_HOST}"
    return None


def parse_target(text: str) -> Target:
    """``tpu:v5e-64`` / ``tpu:v5p-128`` / ``gpu:h100-8`` / ``cpu:8`` -> a :class:`Target`."""
    platform, sep, rest = text.strip().partition(":")
    if platform == "cpu" and sep:
        if not rest.isdigit() or int(rest) < 1:
            raise ConfigError(f"--target {text}: cpu:N needs a positive device count N")
        return Target(text, "cpu", int(rest))
    gen, dash, count = rest.partition("-")
    tables = {"tpu": TOPOLOGIES, "gpu": GPU_CHIPS}.get(platform, {})
    if not dash or gen not in tables or not count.isdigit():
        raise ConfigError(
            f"--target {text!r}: expected tpu:v5e-N, tpu:v5p-N, tpu:v6e-N, gpu:h100-N, gpu:h200-N or cpu:N"
        )
    n = int(count)
    if platform == "gpu":
        topology = gpu_topology(n)
        if topology is None:
            raise ConfigError(f"--target {text}: use 1, 2, 4 or 8 GPUs, or a multiple of 8 (hosts of 8)")
        return Target(text, "gpu", n, topology, GPU_CHIPS[gen], gen)
    table = TOPOLOGIES[gen]
    if n not in table:
        sizes = ", ".join(map(str, table))
        raise ConfigError(f"--target {text}: {gen}-{n} is not a known slice; {gen} sizes: {sizes}")
    chips = n // 2 if gen == "v5p" else n  # v5p counts TensorCores
    return Target(text, "tpu", chips, f"{gen}:{table[n]}", CHIPS[gen])


def gpu_target_config(gen: str) -> str:
    """The ``GpuTargetConfigProto`` text of GPU ``gen``: its device info, platform and name."""
    spec = GPU_SPECS[gen]
    fields = "".join(f"  {k}: {v}\n" for k, v in spec.items())
    return (
        f"gpu_device_info {{\n{fields}  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
        f'platform_name: "CUDA"\ndevice_description_str: "{GPU_DEVICE_NAMES[gen]}"\n'
    )


def _cpu_devices(target: Target) -> list:
    import jax

    # Only ever raised: a process set up with more devices (a test suite's 8) keeps them all.
    if jax.config.jax_num_cpu_devices < target.chips:
        try:
            jax.config.update("jax_num_cpu_devices", target.chips)
        except RuntimeError:  # backends already started: use what is there
            pass
    devices = jax.devices("cpu")
    if len(devices) < target.chips:
        raise ConfigError(
            f"--target {target.text}: this process has {len(devices)} CPU devices (JAX started "
            "before the plan set the count); run `sga-jax plan` in a fresh process"
        )
    return devices[: target.chips]


def _cuda_plugin_missing() -> bool:
    """No CUDA PJRT plugin (jax-cuda12-pjrt / jax-cuda13-pjrt) is installed."""
    try:
        return all(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is None for v in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return True


def target_devices(target: Target) -> list:
    """The devices to compile for: a TPU topology's or GPUs' (no hardware needed) or N CPU devices.
    Must run before JAX starts its backends in this process (the CLI: always)."""
    import jax

    if target.platform == "cpu":
        return _cpu_devices(target)
    if target.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--target {target.text} compiles with libtpu, which is not installed: {TPU_EXTRA}")
    if target.platform == "gpu" and _cuda_plugin_missing():
        raise ConfigError(
            f"--target {target.text} compiles with jax's CUDA plugin, which is not installed: {GPU_EXTRA} "
            "(or jax[cuda12] at your jax version)"
        )
    try:  # no accelerator backend: the plugin is asked for a topology only, CPU stays JAX's default
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
        pass
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips; a plan
    # drives none, so it may run beside another plan or beside training on a TPU VM.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
        else:
            topo = topologies.get_topology_desc(
                platform="cuda", topology_name=target.topology, topology=target.topology,
                target_config=gpu_target_config(target.gpu),
            )  # fmt: skip
    except Exception as e:  # the plugin's own error (version, topology): one line
        raise ConfigError(
            f"--target {target.text}: the {target.platform.upper()} compiler could not describe "
            f"{target.topology}: {' '.join(str(e).split())[:300]}"
        ) from None
    return list(topo.devices)
