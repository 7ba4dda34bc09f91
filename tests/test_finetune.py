"""Fine-tuning from another run (`config.init_from`): what is restored,
what is re-initialised, what is refused; on the session's tiny runs."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from spinenet_jax import checkpoints
from spinenet_jax import finetune
from spinenet_jax import models
from spinenet_jax import optim
from spinenet_jax import sharding
from spinenet_jax import train_lib


def _fresh(config) -> dict:
  model = models.build_model(config)
  s = config.data.image_size
  return jax.device_get(dict(model.init(jax.random.key(5), jnp.zeros(
      (1, s, s, 3)), train=False)))


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _detector(**overrides):
  return tiny.load_config('demo', {**tiny.TINY_DEMO, **overrides})


def test_other_num_classes_keeps_backbone_and_reinits_class_predictor(
    det_workdir):
  source = finetune.source_variables(det_workdir)
  fresh = _fresh(_detector(**{'model.num_classes': 3}))
  merged, counts, reinit = finetune.merge(fresh, source, 'backbone+head')
  src, new, init = (_flat(v['params']) for v in (source, merged, fresh))
  for keys, value in new.items():
    if keys[0] == 'backbone' or np.shape(src[keys]) == np.shape(value):
      np.testing.assert_array_equal(value, src[keys], err_msg=str(keys))
    else:  # The class predictor: fresh, for 3 classes.
      np.testing.assert_array_equal(value, init[keys])
  assert reinit and all(r.startswith('params/head/') for r in reinit)
  assert counts['backbone'] > 0 and counts['head'] > 0
  stats = _flat(merged['batch_stats'])
  for keys, value in _flat(source['batch_stats']).items():
    np.testing.assert_array_equal(stats[keys], value)


def test_backbone_only_leaves_the_head_fresh(det_workdir):
  source = finetune.source_variables(det_workdir)
  fresh = _fresh(_detector())
  merged, counts, _ = finetune.merge(fresh, source, 'backbone')
  new, init, src = (_flat(v['params']) for v in (merged, fresh, source))
  assert counts['head'] == 0
  for keys, value in new.items():
    want = src[keys] if keys[0] == 'backbone' else init[keys]
    np.testing.assert_array_equal(value, want, err_msg=str(keys))


def test_another_backbone_is_refused(det_workdir):
  source = finetune.source_variables(det_workdir)
  fresh = _fresh(_detector(**{'model.endpoints_num_filters': 24}))
  with pytest.raises(finetune.FineTuneError,
                     match=r'another backbone: (params|batch_stats)/backbone/'
                     r'.*\(.*\) there and \(.*\) here'):
    finetune.merge(fresh, source, 'backbone')
  with pytest.raises(finetune.FineTuneError, match='init_from_parts'):
    finetune.merge(fresh, source, 'head')


def test_classifier_head_reinitialised(cls_reference):
  source = finetune.source_variables(cls_reference.workdir)
  config = tiny.load_config('shapes_classification', {
      **tiny.TINY_CLASSIFICATION, 'model.num_classes': 5})
  merged, _, reinit = finetune.merge(_fresh(config), source, 'backbone+head')
  assert reinit and all('head' in r for r in reinit)
  new, src = _flat(merged['params']), _flat(source['params'])
  assert all(np.array_equal(v, src[k]) for k, v in new.items()
             if k[0] == 'backbone')


def test_first_start_loads_init_from_and_a_resume_does_not(det_workdir,
                                                           tmp_path):
  config = _detector(**{'model.num_classes': 3})
  config.init_from = det_workdir
  model = models.build_model(config)
  mesh = sharding.create_mesh(config.mesh)
  tx = optim.create_optimizer(config.optimizer, optim.learning_rate_schedule(
      config.optimizer, config.batch_size, 12))
  source = _flat(finetune.source_variables(det_workdir)['params'])
  logs = []
  manager = checkpoints.create_manager(str(tmp_path), 2, False)
  with jax.set_mesh(mesh):
    state, _, resumed = train_lib.initial_state(model, tx, config, mesh,
                                                manager, logs.append)
  assert resumed is None and 'Initialised from' in logs[-1]
  assert 're-initialised' in logs[-1] and 'params/head/' in logs[-1]
  params = _flat(jax.device_get(state.params))
  for keys, value in params.items():
    if keys[0] == 'backbone':
      np.testing.assert_array_equal(value, source[keys])
  # A checkpoint of the run itself wins over init_from.
  trained = state.replace(params=jax.tree.map(lambda p: p + 1, state.params))
  checkpoints.save(manager, 1, trained, force=True)
  manager.wait_until_finished()
  logs.clear()
  with jax.set_mesh(mesh):
    again, _, resumed = train_lib.initial_state(model, tx, config, mesh,
                                                manager, logs.append)
  manager.close()
  assert resumed == 1 and not any('Initialised' in l for l in logs)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params),
               jax.device_get(trained.params))
