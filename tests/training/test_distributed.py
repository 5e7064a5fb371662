"""Two real processes joined by jax.distributed (CPU gloo collectives), each feeding its own half of the batch,
take the same two train steps as one process with the whole batch."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import traverse_util

from train_helpers import make_batch, run_steps

HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path, tiny_variables, single_device_step):
    variables_path = tmp_path / "variables.npz"
    flat = traverse_util.flatten_dict(jax.device_get(tiny_variables), sep="/")
    np.savez(variables_path, **flat)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    logs = [tmp_path / f"log{pid}.txt" for pid in (0, 1)]
    procs = []
    try:
        for pid in (0, 1):
            with open(logs[pid], "w") as log:  # Files, not pipes: nobody reads while the reference runs.
                procs.append(subprocess.Popen(
                    [sys.executable, str(HERE / "dist_worker.py"), str(pid), port, str(variables_path),
                     str(tmp_path / f"out{pid}.npz")], env=env, stdout=log, stderr=subprocess.STDOUT))
        # The one-process reference compiles while the workers do (it is shared with the other tests).
        mesh, fn, new_state, key = single_device_step
        ref_state, ref_hist = run_steps(fn, new_state(), key, mesh, make_batch(), 2)
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, p in enumerate(procs):
        assert p.returncode == 0, f"process {pid} failed:\n{logs[pid].read_text()[-4000:]}"

    ref_params = traverse_util.flatten_dict(jax.device_get(ref_state.params), sep="/")
    for pid in (0, 1):
        with np.load(tmp_path / f"out{pid}.npz") as out:
            for i in range(2):
                for name in ("loss", "grad_norm"):
                    np.testing.assert_allclose(out[f"step{i}/{name}"], ref_hist[i][name], rtol=1e-5,
                                               err_msg=f"process {pid} step {i} {name}")
            for k, v in ref_params.items():
                np.testing.assert_allclose(out[f"params/{k}"], v, rtol=1e-4, atol=1e-5, err_msg=f"{pid}: {k}")
