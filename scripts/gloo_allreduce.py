"""How XLA:CPU's Gloo all-reduce costs grow with the operands of one tuple all-reduce.

Runs itself as 2 processes x 4 CPU devices on localhost and times a psum over the 8
devices of 42 gradient-sized arrays (the shapes of a small model's weights) as one tuple
all-reduce against the same floats concatenated into one buffer:

  JAX_PLATFORMS=cpu python scripts/gloo_allreduce.py

docs/design.md ("Multi-host") records the numbers: the train step's gradient all-reduce
of a multi-process CPU run pays per operand.
"""

import os
import socket
import subprocess
import sys
import time

SIZES = [257 * 64, 64 * 128, 64, 64, 8 * 64 * 32, 8 * 64 * 32, 8 * 32 * 64] * 6


def worker(pid: int, port: int):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  mesh = jax.make_mesh((8,), ("data",))

  def psum(*xs):
    return jax.shard_map(lambda *a: jax.lax.psum(a, "data"), mesh=mesh,
                         in_specs=P(), out_specs=P(), check_vma=False)(*xs)

  xs = [jnp.ones((n,), jnp.float32) for n in SIZES]
  ways = {"tuple of %d operands" % len(SIZES): jax.jit(lambda xs: psum(*xs)),
          "one flat buffer": jax.jit(lambda xs: psum(jnp.concatenate(xs)))}
  for name, fn in ways.items():
    jax.block_until_ready(fn(xs))
    t = time.perf_counter()
    for _ in range(10):
      jax.block_until_ready(fn(xs))
    if pid == 0:
      print(f"{name}: {(time.perf_counter() - t) / 10 * 1e3:.1f} ms "
            f"({sum(SIZES):,} floats over 8 devices in 2 processes)", flush=True)


def main():
  if len(sys.argv) == 3:
    return worker(int(sys.argv[1]), int(sys.argv[2]))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port)],
                            stderr=subprocess.DEVNULL) for i in range(2)]
  for p in procs:
    p.wait(timeout=300)


if __name__ == "__main__":
  main()
