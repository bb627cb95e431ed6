"""Implied attention weights, batch summaries, heatmaps, TensorBoard images
and the run report (experiments.pictures / plots / report).

Tiny models (1 layer, 2 heads, width 8, length 8) so every test takes
seconds; references are brute-force NumPy.
"""

import json
import os

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from attn import models
from experiments import metrics_io, pictures, plots, report

T = 8


def _lm(spec):
  cfg = models.TransformerConfig(vocab_size=11, emb_dim=8, num_heads=2,
                                 num_layers=1, mlp_dim=8, max_len=T,
                                 attention=spec)
  model = models.TransformerLM(cfg)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 11, (2, T)))
  params = model.init(jax.random.key(0), x)["params"]
  return model, params, x


def _maps(model, params, x):
  with pictures.implied_weights():
    _, inter = jax.jit(lambda p, x: model.apply(
        {"params": p}, x, mutable=["intermediates"]))(params, x)
  return inter, pictures.attention_maps(inter)


def test_exact_kernel_implied_weights_equal_the_sown_weights():
  model, params, x = _lm("softmax")
  inter, maps = _maps(model, params, x)
  sown = np.asarray(models.attention_weights(inter)[0][1])
  implied = np.asarray(inter["intermediates"]["decoder"]["layer_0"][
      "attention"][pictures.IMPLIED][0])
  assert sown.shape == implied.shape == (2, 2, T, T)
  np.testing.assert_allclose(implied, sown, atol=1e-6)
  assert not maps[0].implied          # the sown ones are drawn
  # Causal: nothing above the diagonal, rows sum to one.
  assert np.all(implied[..., np.triu_indices(T, 1)[0],
                        np.triu_indices(T, 1)[1]] == 0)
  np.testing.assert_allclose(implied.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("spec", ["performer(num_features=16)", "linear",
                                  "local(window=2)"])
def test_approximate_kernel_output_is_implied_weights_times_values(spec):
  """out = A·V for random V, with the kernel called directly."""
  from attn import registry  # pylint: disable=g-import-not-at-top
  model, params, x = _lm(spec)
  _, maps = _maps(model, params, x)
  assert len(maps) == 1 and maps[0].implied
  assert maps[0].residual < 1e-4            # linear in V on the real values
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (1, T, 2, 4))
  k = jax.random.normal(kk, (1, T, 2, 4))
  v = jax.random.normal(kv, (1, T, 2, 4))
  fn = registry.get_attention(spec)
  record = {}

  class Module:  # what sow receives
    def sow(self, col, name, value):
      record[name] = value

  out = pictures._implied_fn(fn)(q, k, v, module=Module(), is_causal=True)  # pylint: disable=protected-access
  a_BNTS = np.asarray(record[pictures.IMPLIED], np.float64)
  expected = np.einsum("bnts,bsnh->btnh", a_BNTS, np.asarray(v, np.float64))
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)
  np.testing.assert_allclose(np.asarray(fn(q, k, v, is_causal=True)),
                             np.asarray(out), atol=1e-6)


def test_a_kernel_not_linear_in_values_is_flagged():
  def squared(query, key, value, bias=None, mask=None, **kwargs):
    del bias, mask, kwargs
    w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", query, key), -1)
    return jnp.einsum("bnts,bsnh->btnh", w, value ** 2)

  model, params, x = _lm(squared)
  _, maps = _maps(model, params, x)
  assert maps[0].residual > 1e-2
  assert "NOT linear in V" in pictures.note(maps)


def test_summary_matches_brute_force():
  rng = np.random.default_rng(0)
  w = rng.random((3, 2, 5, 6))
  w /= w.sum(-1, keepdims=True)
  qv = rng.random((3, 5)) > 0.3
  qv[:, 0] = True
  align = np.zeros((3, 5, 6), bool)
  align[:, np.arange(5), np.arange(5)[::-1]] = True
  align[:, 4] = False                       # a query with no alignment
  s = pictures.summarise(w, qv, None, align)
  for n in range(2):
    ent, dist, mass, _cnt, _cnt_a = [], [], [], 0, 0
    for b in range(3):
      for t in range(5):
        if not qv[b, t]:
          continue
        p = w[b, n, t]
        ent.append(-sum(x * np.log(x) for x in p))
        dist.append(sum(p[j] * abs(t - j) for j in range(6)))
        if align[b, t].any():
          mass.append(p[align[b, t]].sum())
    assert s["entropy"][n] == pytest.approx(np.mean(ent))
    assert s["distance"][n] == pytest.approx(np.mean(dist))
    assert s["aligned_mass"][n] == pytest.approx(np.mean(mass))
  flat = pictures.flat_metrics({"enc/attention": s})
  assert flat["enc/attention/head_1/entropy"] == pytest.approx(
      s["entropy"][1])


def test_reverse_and_copy_alignments():
  inputs = np.array([[5, 6, 7, 0]])
  targets = np.array([[7, 6, 5, 2, 0]])
  rev = pictures.alignment("reverse", inputs, targets)[0]
  assert [list(np.flatnonzero(r)) for r in rev] == [[2], [1], [0], [], []]
  cp = pictures.alignment("copy", inputs, targets)[0]
  assert [list(np.flatnonzero(r)) for r in cp] == [[0], [1], [2], [], []]
  srt = pictures.alignment("sort", np.array([[7, 5, 7]]),
                           np.array([[5, 7, 7, 2]]))[0]
  assert [list(np.flatnonzero(r)) for r in srt] == [[1], [0, 2], [0, 2], []]
  assert pictures.alignment("listops", inputs, targets) is None


def test_pictures_report_and_tensorboard(tmp_path):
  workdir = str(tmp_path)
  writer = metrics_io.MetricWriter(workdir, enable_tensorboard=False)
  for step in (1, 2):
    writer.write(step, "train", {"loss": 1.0 / step})
    writer.write(step, "valid", {"loss": 1.0 / step, "accuracy": 0.99})
  writer.write(2, "test", {"accuracy": 0.98})
  writer.write(2, "attention", {"enc/attention/head_0/entropy": 0.5})
  writer.close()
  curves = plots.plot_curves(workdir, os.path.join(workdir, "figures",
                                                   "training_curves.png"))
  w = np.random.default_rng(0).random((2, 2, 4, 4))
  grid = plots.plot_attention_grid(
      w, os.path.join(workdir, "figures", "map.png"), x_labels="abcd",
      y_labels="abcd", title="t", note="implied weights")
  summary = plots.plot_attention_summary(
      {"enc": {"entropy": np.ones(2), "aligned_mass": np.ones(2)},
       "dec": {"entropy": np.ones(2)}},
      os.path.join(workdir, "figures", "attention_summary.png"))
  for p in (curves, grid, summary):
    assert matplotlib.image.imread(p).shape[0] > 100
  assert pictures.log_images(workdir, [curves, grid], 2) == 2
  assert any(f.startswith("events") for f in os.listdir(
      os.path.join(workdir, "tensorboard")))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"model": {"attention": "performer"}}, f)
  path = report.write_report(workdir)
  with open(path, encoding="utf-8") as f:
    page = f.read()
  assert path == os.path.join(workdir, "report.html")
  assert '<img src="figures/map.png"' in page     # relative link
  assert "performer" in page and "0.98" in page
  assert "<td>enc/attention</td><td>0</td><td>0.5</td>" in page


def test_position_ticks_never_crowd_and_long_titles_wrap():
  for n in range(1, 2000, 7):
    step = plots.tick_step(n)
    assert -(-n // step) <= 10 and str(step)[0] in "125"
    smaller = {1: None, 2: 1, 5: 2}.get(int(str(step)[0]))
    if smaller is not None:  # the next smaller nice step would crowd
      assert -(-n // (smaller * step // int(str(step)[0]))) > 10
  assert [plots.tick_step(n) for n in (10, 11, 48, 101)] == [1, 2, 5, 20]
  title = "TransformerEncoder_0/layer_0/attention, head 3"
  wrapped = plots.wrap_path(title, 29)
  assert wrapped.replace("\n", "") == title
  assert max(map(len, wrapped.split("\n"))) <= 29
  assert plots.wrap_path("layer 0, head 1", 29) == "layer 0, head 1"
