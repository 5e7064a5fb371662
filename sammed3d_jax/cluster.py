"""Multi-process start-up: joining a JAX cluster, checking the devices a launch gives us, the topology line.

One code path for every launcher: ``jax.distributed.initialize`` with JAX's own cluster detection (Cloud TPU
pods and GKE, SLURM, Open MPI, Kubernetes) plus explicit overrides (``config.distributed.*``, or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment variables for a hand-made
launch). Nothing else in the code knows how it was launched.

After joining, :func:`check_devices` refuses a launch whose device count is not what it implies. The trap it
exists for: JAX's SLURM detection restricts every process to the single GPU ``SLURM_LOCALID`` names, so one task per
node on 8-GPU nodes trains on one GPU per node and says nothing. Must not import model/, data/, training/ or
ml_collections (it takes a :class:`DistributedOptions`).
"""

import collections
import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How to join the cluster (``config.distributed``); empty values leave the choice to JAX's detection.

    Attributes:
      mode: ``"auto"`` joins when an explicit coordinator is given or JAX detects a cluster environment;
        ``"on"`` always calls ``jax.distributed.initialize()`` (fails if nothing describes the cluster);
        ``"off"`` never joins (one process).
      coordinator_address: ``host:port`` of process 0's coordination service.
      num_processes: processes in the job (0 = detect).
      process_id: this process's index (-1 = detect).
      local_device_ids: devices this process drives: ``"0,1,2,3"``, ``"all"`` (every accelerator of the node, the
        one-task-per-node launch) or ``""`` (JAX's choice: under SLURM one device per task).
      initialization_timeout_s: how long to wait for every process to join.
      cluster_detection_method: force one of JAX's detectors (``"slurm"``, ``"ompi"``, ``"mpi4py"``, ...).
      expect_devices: refuse to start unless the job has exactly this many devices (0 = no check).
    """

    mode: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: str = ""
    initialization_timeout_s: int = 300
    cluster_detection_method: str = ""
    expect_devices: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"config.distributed.mode must be one of {MODES}, got {self.mode!r}")
        if self.num_processes < 0 or self.process_id < -1 or self.initialization_timeout_s < 1:
            raise ValueError("config.distributed: num_processes >= 0, process_id >= -1 and "
                             "initialization_timeout_s >= 1 are required")
        if self.local_device_ids not in ("", "all") and not re.fullmatch(r"\d+(,\d+)*", self.local_device_ids):
            raise ValueError(f"config.distributed.local_device_ids must be '', 'all' or like '0,1,2', "
                             f"got {self.local_device_ids!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "DistributedOptions":
        """Builds the options from ``config.distributed`` (a ConfigDict or dict); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config.distributed keys {unknown}; valid: {sorted(names)}")
        return cls(**{k: values[k] for k in values})


def detect_cluster() -> str | None:
    """The name of the cluster environment JAX's own detection finds (``"slurm"``, ``"gce_tpu"``, ...), or None.

    Uses the detector classes ``jax.distributed.initialize`` itself walks through (opt-in ones such as mpi4py
    excluded, as JAX does); on a JAX without them, only the SLURM and Open MPI variables are looked at.
    """
    try:
        from jax._src import clusters  # JAX's detectors; private, hence the fallback below.

        envs = [e for e in clusters.ClusterEnv._cluster_types if not getattr(e, "opt_in_only_method", False)]
    except (ImportError, AttributeError):
        env = os.environ
        if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
            return "slurm"
        return "ompi" if "OMPI_MCA_orte_hnp_uri" in env else None
    for env_cls in envs:
        try:
            if env_cls.is_env_present():
                return str(getattr(env_cls, "name", env_cls.__name__))
        except Exception as err:  # pylint: disable=broad-except  # A detector probing a metadata server may fail.
            log.debug("cluster detector %s failed: %s", env_cls.__name__, err)
    return None


def _visible_accelerators(env: Mapping[str, str]) -> int | None:
    """Accelerators the launcher gave this node (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES), or None."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in visible.split(",") if d.strip()]) if visible.strip() else None


def _local_device_ids(spec: str, env: Mapping[str, str]) -> list[int] | None:
    if not spec:
        return None
    if spec == "all":
        n = _visible_accelerators(env)
        if not n:
            raise ValueError("config.distributed.local_device_ids='all' needs SLURM_GPUS_ON_NODE or "
                             "CUDA_VISIBLE_DEVICES to say how many devices the node has; list them instead ('0,1,...')")
        return list(range(n))
    return [int(i) for i in spec.split(",")]


def initialize(opts: DistributedOptions, env: Mapping[str, str] | None = None) -> str:
    """Joins the cluster as ``opts`` says; must run before anything touches a JAX device.

    Args:
      opts: the options.
      env: environment variables (default ``os.environ``).

    Returns:
      How this process was launched, for the start-up line: ``"single process"``, ``"explicit"`` or the name of
      JAX's detected environment (``"slurm"``, ``"gce_tpu"``, ...).
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return "already initialised"
    if opts.mode == "off":
        return "single process"
    coordinator = opts.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = opts.num_processes or (int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None)
    process_id = opts.process_id if opts.process_id >= 0 else (
        int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None)
    detected = None if coordinator else detect_cluster()
    if opts.mode == "auto" and not coordinator and detected is None:
        return "single process"
    if coordinator and (num_processes is None or process_id is None) and detect_cluster() is None:
        raise ValueError("a coordinator address is set (JAX_COORDINATOR_ADDRESS or config.distributed."
                         "coordinator_address) but not the process count and index: set JAX_NUM_PROCESSES and "
                         "JAX_PROCESS_ID (or config.distributed.num_processes / process_id) too")
    jax.distributed.initialize(
        coordinator_address=coordinator or None, num_processes=num_processes, process_id=process_id,
        local_device_ids=_local_device_ids(opts.local_device_ids, env),
        cluster_detection_method=opts.cluster_detection_method or None,
        initialization_timeout=int(opts.initialization_timeout_s))
    return "explicit" if coordinator else str(detected or opts.cluster_detection_method or "jax detection")


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks SLURM runs on this node (SLURM_NTASKS_PER_NODE, or this node's entry of SLURM_TASKS_PER_NODE)."""
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    counts = []
    for part in filter(None, spec.split(",")):  # "8(x4),4": 8 tasks on each of 4 nodes, then 4 on one node.
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else None


def check_devices(opts: DistributedOptions, *, local_devices: int, global_devices: int, processes: int,
                  per_process: Sequence[int], env: Mapping[str, str] | None = None) -> None:
    """Refuses a launch whose device count differs from what it implies (one line saying what to type).

    Args:
      opts: the options (``expect_devices``, ``local_device_ids``).
      local_devices: devices of this process.
      global_devices: devices of the job.
      processes: processes of the job.
      per_process: device count of every process (index = process index).
      env: environment variables (default ``os.environ``).

    Raises:
      ValueError: with the launch line to use instead.
    """
    env = os.environ if env is None else env
    if opts.expect_devices and global_devices != opts.expect_devices:
        raise ValueError(f"the job has {global_devices} devices ({processes} processes x {local_devices}) but "
                         f"config.distributed.expect_devices={opts.expect_devices}")
    if len(set(per_process)) > 1:
        raise ValueError(f"processes drive different numbers of devices {list(per_process)}; launch the same number "
                         "of devices per process")
    node_accelerators = _visible_accelerators(env) if "SLURM_JOB_ID" in env else None
    tasks = _slurm_tasks_on_node(env) if node_accelerators else None
    if node_accelerators and tasks and tasks * local_devices < node_accelerators:
        raise ValueError(
            f"SLURM gives this node {node_accelerators} GPUs but runs {tasks} task(s) on it that see {local_devices} "
            f"device(s) each, so {node_accelerators - tasks * local_devices} GPUs would sit idle (JAX's SLURM "
            f"detection gives each task only the GPU of its SLURM_LOCALID). Launch one task per GPU: "
            f"srun --ntasks-per-node={node_accelerators} --gpus-per-node={node_accelerators} python train.py ..., "
            "or keep one task per node with --config.distributed.local_device_ids=all")


def check_launch(opts: DistributedOptions) -> None:
    """:func:`check_devices` on the running job."""
    counts = collections.Counter(d.process_index for d in jax.devices())
    check_devices(opts, local_devices=jax.local_device_count(), global_devices=jax.device_count(),
                  processes=jax.process_count(), per_process=[counts[p] for p in range(jax.process_count())])


def topology_line(mesh: Any, *, global_batch: int, rows_per_process: int, launched_by: str) -> str:
    """The start-up line: processes, devices, device kind, mesh axes and the batch each process feeds."""
    axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    device = jax.devices()[0]
    return (f"topology: {jax.process_count()} process(es) x {jax.local_device_count()} local device(s) = "
            f"{jax.device_count()} {device.device_kind} ({device.platform}) devices; mesh {axes}; "
            f"global batch {global_batch}, {rows_per_process} per process; launch: {launched_by}")
