"""Device meshes, shardings and multi-host start-up, on JAX's own runtime.

A mesh has three named axes:

* ``"data"``  -- batch (data parallelism; the default: all devices),
* ``"seq"``   -- sequence (ring attention, :mod:`attn.kernels.ring`),
* ``"model"`` -- attention heads.

Typical use from a config (``config.mesh = {"data": -1, "seq": 1}``)::

    attn.parallel.initialize_distributed(coordinator, num_processes, pid)
    mesh = attn.parallel.make_mesh(**config.mesh)
    start, size = attn.parallel.host_batch_slice(global_batch, mesh)
    batch = attn.parallel.shard_batch(load(start, size), mesh)
    with jax.set_mesh(mesh):   # lets "ring" attention find the mesh
      state = train_step(state, batch)

Meshes use ``AxisType.Auto`` axes: arrays carry a ``NamedSharding`` and XLA
propagates shardings through ``jax.jit`` (no sharding-in-types).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "seq", "model")


def make_mesh(data: int = -1, seq: int = 1, model: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ``Mesh`` with axes ``("data", "seq", "model")`` over ``devices``.

  Args:
    data / seq / model: axis sizes; at most one may be ``-1``, meaning "all
      remaining devices". ``make_mesh(**config.mesh)`` works for a dict or
      ``ConfigDict`` with these keys.
    devices: defaults to ``jax.devices()`` (every device of every process).

  Returns:
    ``Mesh`` of shape ``(data, seq, model)``, topology-aware device order
    (``jax.make_mesh``), ``AxisType.Auto`` axes.

  Raises:
    ValueError: a size is not a positive int or -1, more than one -1, or the
      product does not equal the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "seq": seq, "model": model}
  for name, size in sizes.items():
    if (isinstance(size, bool) or not isinstance(size, (int, np.integer))
        or (size != -1 and size < 1)):
      raise ValueError(f"mesh.{name} must be a positive int or -1 (all "
                       f"remaining devices), got {size!r}")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free} in "
                     f"{sizes}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(
          f"mesh {sizes}: the fixed axes use {fixed} devices, which does not "
          f"divide the {len(devices)} available devices")
    sizes[free[0]] = len(devices) // fixed
  shape = tuple(int(sizes[name]) for name in AXES)
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, but "
        f"{len(devices)} are available; use -1 for one axis to take the rest")
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def data_sharding(mesh: Mesh, sequence: bool = False) -> NamedSharding:
  """Batch sharding: leading axis over ``"data"``.

  With ``sequence=True`` the second axis (tokens) is also split over
  ``"seq"``; use it for ``[batch, length, ...]`` arrays in long-context runs.
  """
  return NamedSharding(mesh, P("data", "seq") if sequence else P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """Full replication on every device of ``mesh`` (parameters by default)."""
  return NamedSharding(mesh, P())


def _process_data_rows(mesh: Mesh, process_index: int) -> Tuple[int, int]:
  """``(first, count)`` of the ``"data"`` coordinates a process's devices hold.

  Raises ValueError when they are not contiguous.
  """
  axis = mesh.axis_names.index("data")
  devices = np.moveaxis(mesh.devices, axis, 0)
  rows = [i for i in range(devices.shape[0])
          if any(d.process_index == process_index for d in devices[i].flat)]
  if not rows:
    raise ValueError(f"process {process_index} owns no device of the mesh")
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"process {process_index} holds non-contiguous data "
                     f"shards {rows}; build the mesh with make_mesh()")
  return rows[0], len(rows)


def host_batch_slice(global_batch_size: int, mesh: Optional[Mesh] = None,
                     process_index: Optional[int] = None,
                     process_count: Optional[int] = None) -> Tuple[int, int]:
  """Rows ``[start, start + size)`` of the global batch this host loads.

  With ``mesh``: the rows that this process's devices hold under
  :func:`data_sharding` -- distinct for hosts on different ``"data"``
  shards, identical for hosts that only split the sequence or heads (they
  need the same examples). Without ``mesh``: an even split by process index.

  Args:
    global_batch_size: examples per step over all hosts.
    mesh: the training mesh (recommended).
    process_index / process_count: default ``jax.process_index()`` /
      ``jax.process_count()``.

  Raises:
    ValueError: the batch does not split evenly.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count})")
  if mesh is None:
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not "
                       f"divisible by the {process_count} processes")
    size = global_batch_size // process_count
    return process_index * size, size
  shards = mesh.shape["data"]
  if global_batch_size % shards:
    raise ValueError(f"global batch size {global_batch_size} is not "
                     f"divisible by mesh.data={shards}")
  per_shard = global_batch_size // shards
  first, count = _process_data_rows(mesh, process_index)
  return first * per_shard, count * per_shard


def shard_batch(batch: Any, mesh: Mesh, sequence: bool = False) -> Any:
  """Host-local batch pytree -> global ``jax.Array``s sharded over ``"data"``.

  Each leaf holds this host's rows (:func:`host_batch_slice` with ``mesh``)
  and, for ``[batch, length, ...]`` leaves with ``sequence=True``, the full
  sequence (it is split over ``"seq"`` on the devices). One process: the leaf
  is the whole batch.
  """
  shards = mesh.shape["data"]
  _, count = _process_data_rows(mesh, jax.process_index())

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("shard_batch needs arrays with a batch axis, got a "
                       "scalar leaf")
    if x.shape[0] % count:
      raise ValueError(f"host batch of {x.shape[0]} rows does not split over "
                       f"this host's {count} data shards")
    sharding = data_sharding(mesh, sequence and x.ndim >= 2)
    global_shape = (x.shape[0] // count * shards,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Starts JAX's multi-host runtime (``jax.distributed.initialize``).

  Call first thing, before any other JAX call. With no arguments JAX's own
  auto-detection is used (Cloud TPU pods, Slurm, Open MPI, Kubernetes, or
  the ``JAX_COORDINATOR_ADDRESS`` environment variable); when it finds no
  cluster this is a no-op and the run is single-process. ``num_processes=1``
  is always a no-op.

  Args:
    coordinator_address: ``"host:port"`` of process 0, reachable by all.
    num_processes: number of processes (usually one per host).
    process_id: this process, ``0 <= process_id < num_processes``.

  Returns:
    True when the distributed runtime is running (started now or before),
    False for a single-process run.

  Raises:
    ValueError: inconsistent arguments.
    RuntimeError: called after JAX already initialised its backends.
  """
  if jax.distributed.is_initialized():
    return True
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if num_processes == 1 and coordinator_address is None:
    return False
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"process_id {process_id} not in [0, {num_processes})")
  explicit = (coordinator_address, num_processes, process_id) != (None,) * 3
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  except ValueError as e:
    # JAX found no cluster environment to detect the coordinator from.
    if explicit or "coordinator_address" not in str(e):
      raise
    return False
  return True
