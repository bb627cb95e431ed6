"""Meshes, batch sharding and multi-host start-up (attn.parallel).

Checks that need 8 devices or two real processes run in subprocesses
(tests/multidevice_helpers.py); the arithmetic is checked in-process.
"""

import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import AxisType, PartitionSpec as P

from attn import parallel
from tests import multidevice_helpers as helpers


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  process_index: int


@dataclasses.dataclass
class _FakeMesh:
  """Duck-typed mesh: device grid with process indices, like jax's Mesh."""
  devices: np.ndarray
  axis_names: tuple = parallel.AXES

  @property
  def shape(self):
    return dict(zip(self.axis_names, self.devices.shape))


def _fake_mesh(process_of_device, shape):
  grid = np.empty(len(process_of_device), dtype=object)
  grid[:] = [_FakeDevice(p) for p in process_of_device]
  return _FakeMesh(grid.reshape(shape))


@pytest.mark.parametrize("kwargs, message", [
    ({"data": 3}, "needs 3 devices, but 8 are available"),
    ({"data": -1, "seq": 3}, "does not divide the 8 available devices"),
    ({"data": -1, "seq": -1}, "at most one mesh axis may be -1"),
    ({"data": 0}, "mesh.data must be a positive int or -1"),
    ({"seq": 2.0}, "mesh.seq must be a positive int or -1"),
])
def test_make_mesh_errors(kwargs, message):
  eight = [jax.devices()[0]] * 8      # only counted: errors come first
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(devices=eight, **kwargs)


def test_make_mesh_one_device_and_shardings():
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  assert mesh.axis_names == ("data", "seq", "model")
  assert mesh.devices.shape == (1, 1, 1)
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert parallel.data_sharding(mesh).spec == P("data")
  assert parallel.data_sharding(mesh, sequence=True).spec == P("data", "seq")
  assert parallel.replicated(mesh).spec == P()


@settings(max_examples=25, deadline=None)
@given(processes=st.integers(1, 8), per_host=st.integers(1, 6))
def test_host_batch_slice_partitions_the_batch(processes, per_host):
  slices = [parallel.host_batch_slice(processes * per_host, None, i,
                                      processes) for i in range(processes)]
  rows = np.concatenate([np.arange(a, a + n) for a, n in slices])
  np.testing.assert_array_equal(rows, np.arange(processes * per_host))


def test_host_batch_slice_errors():
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    parallel.host_batch_slice(10, None, 0, 3)
  with pytest.raises(ValueError, match="process_index 2 not in"):
    parallel.host_batch_slice(8, None, 2, 2)


def test_host_batch_slice_follows_the_mesh():
  # 2 hosts x 4 devices; data=4, seq=2: host p holds data rows 2p, 2p+1.
  mesh = _fake_mesh([0, 0, 0, 0, 1, 1, 1, 1], (4, 2, 1))
  assert parallel.host_batch_slice(32, mesh, 0, 2) == (0, 16)
  assert parallel.host_batch_slice(32, mesh, 1, 2) == (16, 16)
  with pytest.raises(ValueError, match="not divisible by mesh.data=4"):
    parallel.host_batch_slice(30, mesh, 0, 2)
  # data=1, seq=8 over both hosts: they need the same examples.
  mesh = _fake_mesh([0, 0, 0, 0, 1, 1, 1, 1], (1, 8, 1))
  assert parallel.host_batch_slice(4, mesh, 0, 2) == (0, 4)
  assert parallel.host_batch_slice(4, mesh, 1, 2) == (0, 4)
  mesh = _fake_mesh([0, 1, 0, 1], (4, 1, 1))
  with pytest.raises(ValueError, match="non-contiguous data shards"):
    parallel.host_batch_slice(8, mesh, 0, 2)


def test_initialize_distributed_validates_before_calling_jax():
  assert not jax.distributed.is_initialized()
  with pytest.raises(ValueError, match="num_processes must be >= 1"):
    parallel.initialize_distributed("localhost:1234", 0, 0)
  with pytest.raises(ValueError, match=r"process_id 3 not in \[0, 2\)"):
    parallel.initialize_distributed("localhost:1234", 2, 3)
  assert parallel.initialize_distributed(num_processes=1) is False


def test_meshes_and_batches_on_8_devices():
  r = helpers.run_helper("mesh")
  assert r["initialize_no_args"] is False
  assert r["initialize_one_process"] is False
  assert (r["process_count"], r["device_count"]) == (1, 8)
  assert r["shapes"] == {"default": [8, 1, 1], "seq2": [4, 2, 1],
                         "seq_rest": [2, 4, 1], "all3": [2, 2, 2],
                         "config": [2, 4, 1]}
  assert all(r["errors"].values()), r["errors"]
  assert r["shard_batch"] == {
      "placed": True, "x_shard": [4], "tokens_shard": [4, 4],
      "x_spec": "P('data',)", "tokens_spec": "P('data', 'seq')"}
  assert r["host_batch_slice"] == [0, 16]
  assert r["replicated_spec"] == "P()"


def test_two_processes_on_localhost_agree_with_one():
  """jax.distributed over loopback, gloo CPU collectives, 2 x 2 devices."""
  results = helpers.run_processes(num_processes=2, devices_per_process=2)
  for i, r in enumerate(results):
    assert r["started"] is True
    assert (r["process_index"], r["process_count"]) == (i, 2)
    assert (r["device_count"], r["local_device_count"]) == (4, 2)
    assert r["sum_sq_err"] <= 1e-4 and r["psum_err"] <= 1e-4, r
    assert r["allgather_equal"] is True
    assert r["ring_out_err"] <= 2e-5 and r["ring_grad_err"] <= 2e-5, r
  # Each host loaded different examples, together the whole batch.
  assert sorted(tuple(r["slice"]) for r in results) == [(0, 4), (4, 4)]
