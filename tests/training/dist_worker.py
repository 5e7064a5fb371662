"""One process of the two-process test (test_distributed.py); not a test module.

Usage: python dist_worker.py PROCESS_ID PORT VARIABLES_NPZ OUT_NPZ. Joins the cluster through
``parallel.maybe_initialize_distributed`` (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), feeds only
its own half of the global batch, runs two train steps and writes the resulting params and metrics.
"""

import os
import sys

pid, port, variables_path, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                  JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU all-reduce across processes.
jax.config.update("jax_default_matmul_precision", "float32")

from sammed3d_jax import parallel  # noqa: E402

assert parallel.maybe_initialize_distributed("auto"), "the environment should have described a cluster"
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

from train_helpers import BATCH, build_step, make_batch  # noqa: E402

with np.load(variables_path) as f:
    variables = traverse_util.unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})
mesh = parallel.make_mesh()
fn, new_state, key = build_step(mesh, variables)
state = new_state()
batch = make_batch()
half = BATCH // 2
local = {k: v[pid * half:(pid + 1) * half] for k, v in batch.items()}  # Only this process's shard.
out = {}
for i in range(2):
    state, metrics = fn(state, parallel.shard_host_batch(local, mesh), key)
    for name in ("loss", "grad_norm"):
        out[f"step{i}/{name}"] = np.asarray(metrics[name].addressable_data(0))
flat = traverse_util.flatten_dict(state.params, sep="/")
out.update({f"params/{k}": np.asarray(v.addressable_data(0)) for k, v in flat.items()})
np.savez(out_path, **out)
print(f"process {pid} done", flush=True)
