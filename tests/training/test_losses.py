"""The REALM / ORQA marginal likelihoods against naive per-candidate loops (numpy, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.training import losses


def _logsumexp(x):
  m = max(x)
  return m + np.log(sum(np.exp(v - m) for v in x))


def test_marginal_log_likelihood_matches_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 7)) * 3
  correct = rng.random((4, 7)) < 0.3
  correct[2] = False  # a row with nothing correct → 0
  valid = np.ones((4, 7), bool)
  valid[1, 5:] = False
  ll, any_correct = losses.marginal_log_likelihood(jnp.asarray(logits), jnp.asarray(correct),
                                                   jnp.asarray(valid))
  for b in range(4):
    ok = [logits[b, i] for i in range(7) if correct[b, i] and valid[b, i]]
    allv = [logits[b, i] for i in range(7) if valid[b, i]]
    expected = _logsumexp(ok) - _logsumexp(allv) if ok else 0.0
    assert any_correct[b] == bool(ok)
    np.testing.assert_allclose(ll[b], expected, rtol=1e-5, atol=1e-5)


def test_reader_loss_adds_retriever_logit_per_block():
  rng = np.random.default_rng(1)
  b, r, s = 2, 3, 5
  span = rng.normal(size=(b, r, s))
  retr = rng.normal(size=(b, r))
  answer = rng.random((b, r, s)) < 0.2
  answer[0, 0, 0] = True
  valid = np.ones((b, r, s), bool)
  valid[:, :, -1] = False
  loss, _ = losses.reader_loss(jnp.asarray(span), jnp.asarray(retr), jnp.asarray(answer),
                               jnp.asarray(valid))
  for i in range(b):
    joint_ok = [span[i, z, k] + retr[i, z] for z in range(r) for k in range(s)
                if answer[i, z, k] and valid[i, z, k]]
    joint_all = [span[i, z, k] + retr[i, z] for z in range(r) for k in range(s) if valid[i, z, k]]
    expected = -(_logsumexp(joint_ok) - _logsumexp(joint_all)) if joint_ok else 0.0
    np.testing.assert_allclose(loss[i], expected, rtol=1e-5, atol=1e-5)


def test_mlm_marginal_is_per_token_not_product():
  """log p(y_j|x) = logsumexp_k [log p(z_k|x) + log p(y_j|z_k,x)], for each masked token j."""
  rng = np.random.default_rng(2)
  b, k, m, v = 2, 4, 3, 11
  retr = rng.normal(size=(b, k))
  mlm = rng.normal(size=(b, k, m, v)) * 2
  targets = rng.integers(0, v, size=(b, m))
  valid = np.ones((b, k), bool)
  valid[1, 2] = False  # a dropped trivial retrieval
  out = losses.mlm_marginal_log_likelihood(jnp.asarray(retr), jnp.asarray(mlm),
                                           jnp.asarray(targets), jnp.asarray(valid))
  for i in range(b):
    zs = [z for z in range(k) if valid[i, z]]
    log_pz = {z: retr[i, z] - _logsumexp([retr[i, y] for y in zs]) for z in zs}
    for j in range(m):
      per_z = {z: mlm[i, z, j, targets[i, j]] - _logsumexp(list(mlm[i, z, j])) for z in zs}
      expected = _logsumexp([log_pz[z] + per_z[z] for z in zs])
      np.testing.assert_allclose(out["token_log_likelihood"][i, j], expected, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(out["null_log_likelihood"][i, j], per_z[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.exp(out["log_p_z"][i]).sum(), 1.0, rtol=1e-5)
    assert np.exp(out["log_p_z"][i, ~valid[i]]).max(initial=0) < 1e-30


def test_gradients_are_finite_when_nothing_is_correct():
  logits = jnp.zeros((2, 5))
  correct = jnp.zeros((2, 5), bool)
  g = jax.grad(lambda x: losses.retriever_loss(x, correct)[0].sum())(logits)
  assert np.all(np.isfinite(g)) and np.all(g == 0)


@pytest.mark.parametrize("w,expected", [([1, 1, 0], 1.5), ([0, 0, 0], 0.0)])
def test_weighted_mean(w, expected):
  assert float(losses.weighted_mean(jnp.array([1.0, 2.0, 100.0]), jnp.array(w))) == expected
