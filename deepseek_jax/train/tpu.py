"""TPU slices described on any host: the chips' public numbers, topology names, and a
slice's abstract devices.

libtpu (the `tpu` extra) describes a TPU slice without one: `get_topology_desc` gives its
abstract devices, over which a Mesh is built and a program compiled by the TPU compiler
(train/aot.py for the train step, inference/compile_decode.py and compile_prefill.py for
serving).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float      # bf16 FLOP/s
  hbm_bytes: float
  ici_bw: float          # bytes/s per chip, bidirectional
  hbm_bw: float          # bytes/s
  source: str


# Public per-chip numbers (Cloud TPU system architecture pages, read 2026-12).
CHIPS = {
    # HBM: the 95.74 GiB the TPU compiler reports available (the page says 95 GiB).
    "v5p": Chip(459e12, 95.74 * GIB, 1200e9, 2765e9,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at "
                "2765 GB/s (95.74 GiB available per the TPU compiler), 1200 GB/s "
                "bidirectional ICI per chip"),
    "v6e": Chip(918e12, 32e9, 800e9, 1638e9,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, "
                "800 GB/s bidirectional ICI per chip"),
    "v5e": Chip(197e12, 16e9, 400e9, 819e9,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, "
                "400 GB/s bidirectional ICI per chip"),
    "v4": Chip(275e12, 32 * GIB, 1.1e15 / 4096, 1200e9,
               "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; "
               "ICI per chip taken as the pod's 1.1 PB/s all-reduce bandwidth / 4096 chips"),
}
_DIMS = {"v5p": 3, "v4": 3, "v6e": 2, "v5e": 2}


class TopologyError(ValueError):
  pass


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """"v5p:8x16x16" -> ("v5p", (8, 16, 16)), with a clear error for anything else."""
  m = re.fullmatch(r"(v5p|v6e|v5e|v4):(\d+(?:x\d+)*)", name.strip())
  if not m:
    raise TopologyError(
        f"unknown topology {name!r}: expected v5p:AxBxC, v4:AxBxC, v6e:AxB or v5e:AxB "
        f"(e.g. v5p:8x16x16 for 2048 chips, v5p:2x2x1 for one host)")
  kind, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if len(dims) != _DIMS[kind] or min(dims) < 1:
    raise TopologyError(f"topology {name!r}: {kind} takes {_DIMS[kind]} positive dims")
  return kind, dims


def topology_devices(name: str):
  """The abstract devices of a TPU slice (needs libtpu: pip install -e '.[tpu]')."""
  kind, dims = parse_topology(name)
  # Describing a topology holds no TPU: let several processes (tests, parallel compiles)
  # load libtpu at once instead of failing on its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # libtpu missing or refusing the shape
    raise TopologyError(
        f"could not describe TPU topology {name!r} ({type(e).__name__}: {e}). "
        "TPU compilation needs libtpu: pip install -e '.[tpu]'") from e
  devices = list(topo.devices)
  if len(devices) != math.prod(dims):
    raise TopologyError(f"topology {name!r} gave {len(devices)} devices, "
                        f"expected {math.prod(dims)}")
  return devices
