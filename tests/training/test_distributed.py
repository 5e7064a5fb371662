"""The whole training loop over several real processes (jax.distributed, CPU gloo collectives, fake devices),
launched as users launch it: ``train.py`` with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

A 2-process x 2-device run is pre-empted with SIGTERM to both processes, saves at a step they agree on, and resumes
as 1 process x 4 devices; it ends with the params and losses of an uninterrupted 2 x 2 run. Params are exported
from 1 and 2 processes; metrics are written once. Also: a kill during an async save leaves nothing that restore
would pick up. (On 2 cores every process compiles the step, so the jobs run one after another. They share a
persistent compilation cache (train.py's ``--cache_dir``), but only process 0 writes it and its keys differ per
process, so of the second 2 x 2 job only process 0 loads its step from it, which the test checks.)
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.checkpoint.params_io import load_params

REPO = pathlib.Path(__file__).resolve().parents[2]
TOTAL = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(prepared: str) -> list[str]:
    # eps 1e-3: Adam's first updates stay smooth in the gradient, so the other reduction orders of other topologies
    # move params by float round-off instead of flipping signs of near-zero gradient entries.
    return ["--config.model.variant=tiny", f"--config.data.prepared_dir={prepared}",
            "--config.data.min_crop_foreground=50", "--config.batch_size=4", f"--config.total_steps={TOTAL}",
            "--config.clicks.max_clicks=2", "--config.clicks.min_clicks=2", "--config.optim.warmup_steps=1",
            "--config.optim.eps=1e-3", "--config.checkpoint.every_steps=3", "--config.log_every_steps=1",
            "--config.plot_every_steps=1000", "--config.progress=False"]


class Job:
    """``processes`` copies of train.py with ``devices`` fake CPU devices each, logging to files."""

    def __init__(self, tmp: pathlib.Path, name: str, processes: int, devices: int, args: list[str]):
        port = _free_port()
        self.logs = [tmp / f"{name}.{p}.log" for p in range(processes)]
        self.procs = []
        cache = tmp / "jax_cache"
        for p in range(processes):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
            env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            if processes > 1:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                           JAX_PROCESS_ID=str(p))
            with open(self.logs[p], "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *args,
                                                    f"--cache_dir={cache}"], env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp))

    def signal(self, sig: int) -> None:
        for p in self.procs:
            p.send_signal(sig)

    def wait(self, timeout: float = 1200) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.time())) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()

    def output(self, p: int = 0) -> str:
        return self.logs[p].read_text()


def _steps(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _assert_ok(job: Job, codes: list[int]) -> None:
    for p, code in enumerate(codes):
        assert code == 0, f"process {p} exited {code}:\n{job.output(p)[-4000:]}"


def test_preempted_2x2_resumes_as_1x4_like_an_uninterrupted_run(tmp_path, prepared):
    flags = _flags(prepared)
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    job = Job(tmp_path, "2x2-interrupted", 2, 2, [*flags, f"--workdir={interrupted}"])
    deadline = time.time() + 1200
    while not any(r["step"] >= 2 for r in _steps(interrupted)):  # Pre-empt once step 2 is logged.
        assert time.time() < deadline and all(p.poll() is None for p in job.procs), job.output(0)[-4000:]
        time.sleep(0.05)
    job.signal(signal.SIGTERM)
    codes = job.wait()
    ref = Job(tmp_path, "2x2-reference", 2, 2, [*flags, f"--workdir={reference}"])  # After the first: 2 cores.
    outputs = [job.output(p) for p in range(2)]
    assert codes == [143, 143], outputs[0][-4000:]
    lines = [[x for x in out.splitlines() if x.startswith("error: stopped by SIGTERM")] for out in outputs]
    assert lines[0] and lines[0] == lines[1], outputs  # Both processes name the same step.
    stopped = int(lines[0][0].split(" at step ")[1].split(";")[0])
    assert 2 < stopped < TOTAL and f"--workdir {interrupted} --resume" in lines[0][0]
    assert orbax_io.latest_step(orbax_io.make_manager(interrupted, save_every=3, keep=3, read_only=True)) == stopped
    assert "topology: 2 process(es) x 2 local device(s) = 4 cpu" in outputs[0]
    assert "topology:" not in outputs[1]  # The start-up line comes from process 0 only.

    ref_codes = ref.wait()  # Every job waited for (or killed) before any assertion.
    as_1x4 = Job(tmp_path, "1x4", 1, 4, [*flags, f"--workdir={interrupted}", "--resume"])
    codes = as_1x4.wait()
    _assert_ok(ref, ref_codes)
    _assert_ok(as_1x4, codes)
    assert f"resumed from step {stopped}" in as_1x4.output()
    assert "1 process(es) x 4 local device(s)" in as_1x4.output()
    # train.py's compilation cache (--cache_dir): the same job started again loads its step on process 0.
    assert "programs from the compilation cache" not in outputs[0]
    assert "programs from the compilation cache)" in ref.output(0), ref.output(0)[-3000:]

    ref_params, _, ref_meta = load_params(reference / "params")  # Exported by 2 processes.
    ref_steps = _steps(reference)
    assert [r["step"] for r in ref_steps] == list(range(1, TOTAL + 1))  # Written once, by process 0.
    for workdir in (interrupted,):  # Exported by 1 process (the reference: by 2).
        steps = _steps(workdir)
        assert [r["step"] for r in steps] == list(range(1, TOTAL + 1)), workdir
        np.testing.assert_allclose([r["loss"] for r in steps], [r["loss"] for r in ref_steps], rtol=1e-5)
        params, _, meta = load_params(workdir / "params")
        assert meta["step"] == ref_meta["step"] == TOTAL
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{workdir.name}: {path}")
        (record,) = [json.loads(x) for x in (workdir / "resumes.jsonl").read_text().splitlines()]
        assert record["step"] == stopped and record["changes"] == {}


KILL_DURING_SAVE = """
import os, signal, sys
import jax, numpy as np
from sammed3d_jax.checkpoint import orbax_io
manager = orbax_io.make_manager(sys.argv[1], save_every=1, keep=5, async_save=True)
big = {"w": np.arange(8_000_000, dtype=np.float32)}
orbax_io.save(manager, 1, big, {"next_batch": 1})
manager.wait_until_finished()
orbax_io.save(manager, 2, {"w": big["w"] + 1}, {"next_batch": 2})  # Returns while the write goes on...
os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies in the middle of it.
"""


def test_kill_during_async_save_leaves_the_last_complete_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "1" in leftovers and "2" not in leftovers, leftovers  # Step 2 never became a checkpoint.
    manager = orbax_io.make_manager(tmp_path, save_every=1, keep=5)
    assert manager.all_steps() == [1]
    target = {"w": jax.ShapeDtypeStruct((8_000_000,), np.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    state, position = orbax_io.restore(manager, target, 1)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(8_000_000, dtype=np.float32))
    assert position == {"next_batch": 1}
    manager.close()
