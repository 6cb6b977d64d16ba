"""Builds everything an OPD run needs from a config: model, frozen pytree, state, shardings.

Kept apart from the loop so tests and notebooks can build the same pieces and call the jitted
round directly (e.g. to compare a 4×2 mesh with one device).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from opd_jax.errors import ConfigError
from opd_jax.models.loading.pretrained import init_lora_state
from opd_jax.models.lora import stack_adapters
from opd_jax.models.policy import Policy
from opd_jax.models.registry import build_model
from opd_jax.opd.config import num_train_steps
from opd_jax.opd.round import RoundSpec, make_round_fn
from opd_jax.opd.teachers import teacher_index
from opd_jax.parallel import sharding as shd
from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.sampling.step import KernelSpec
from opd_jax.train.state import EMARule, make_optimizer, sharded_train_state


@dataclasses.dataclass
class OPDSetup:
  spec: RoundSpec
  tx: optax.GradientTransformation
  frozen: dict
  frozen_shardings: dict
  state_shardings: Any
  init_state: Any          # callable () → TrainState, jitted with out_shardings
  abstract_state: Any      # ShapeDtypeStructs with shardings (restore target)
  round_fn: Any            # the jitted round (state, frozen, batch) → (state, metrics)
  mesh: Mesh
  teacher_tasks: tuple[str, ...]   # the task of each stacked teacher slot
  teacher_index: np.ndarray        # int32 [M]: slot of data.tasks[m]'s teacher


def random_teacher_adapters(lora_template: nnx.State, num: int, seed: int,
                            scale: float) -> list[dict]:
  """Seeded stand-in teacher adapters with non-zero B (so each teacher differs from the base)."""
  out = []
  for k in range(num):
    key = jax.random.PRNGKey(seed + 1000 + k)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(lora_template))
    keys = jax.random.split(key, len(leaves))
    out.append(jax.tree.unflatten(treedef, [
        jax.random.normal(kk, x.shape, jnp.float32) * scale for kk, x in zip(keys, leaves)]))
  return out


def round_spec(config, policy: Policy) -> RoundSpec:
  m, r, o, t = config.model, config.rollout, config.objective, config.train
  if r.shift <= 0:
    raise ConfigError('config.rollout.shift: 0 means "the checkpoint\'s scheduler shift", which '
                      'only a diffusers base resolves; set it explicitly')
  return RoundSpec(
      policy=policy,
      sigmas=tuple(float(s) for s in flow_match_sigmas(r.num_steps, r.shift)),
      latent_shape=(m.latent_size, m.latent_size, m.latent_channels),
      kernel=KernelSpec(r.kernel, float(r.noise_level)),
      student_cfg=float(r.cfg_scale),
      num_train_steps=num_train_steps(config),
      objective=o.name, reduction=o.kl_reduction, normaliser=o.kl_normaliser,
      time_reduction=o.time_reduction, num_microbatches=t.num_microbatches,
      timestep_chunks=t.timestep_chunks, ema=EMARule.from_config(config.ema),
      logprob_reduction=r.logprob_reduction, clip_range=o.clip_range, discount=o.discount,
      fused_vjp=bool(t.fused_vjp))


def build_opd(config, mesh: Mesh, negative: dict, *, base_params: dict | None = None,
              teachers: list[dict] | None = None) -> OPDSetup:
  """Model, frozen pytree (base + stacked teachers + CFG scales + empty-prompt embedding),
  train-state factory and the jitted round, all sharded over `mesh`.

  Args:
    base_params: pure-dict base weights (default: the seeded random init).
    teachers: teacher parameter pytrees (adapters, or full weights when teachers.kind ==
      'full'), one per task of config.data.tasks, in that order (the teachers' slots); default:
      seeded random stand-ins.
  """
  m, l = config.model, config.lora
  # Given base weights, the network is only traced for its structure (no random init).
  loaded = base_params is not None
  graphdef, base_state, lora_state = build_model(
      m, abstract=loaded, seed=config.seed, lora_rank=l.rank, lora_alpha=l.alpha,
      lora_init=l.init)
  if loaded:
    lora_state = init_lora_state(lora_state, seed=config.seed, init=l.init)
  policy = Policy(graphdef, config.student.kind, config.teachers.kind,
                  batch_sharding=shd.batch_sharding(mesh, 1))
  base = base_params if loaded else nnx.to_pure_dict(base_state)
  teacher_tasks = tuple(config.data.tasks)   # slot k holds the teacher of data.tasks[k]
  num_teachers = len(teacher_tasks)
  if teachers is None:
    if config.teachers.kind == 'lora':
      teachers = random_teacher_adapters(lora_state, num_teachers, config.seed,
                                         config.teachers.random_scale)
    else:
      teachers = [jax.tree.map(lambda x, k=k: x + config.teachers.random_scale *
                               jax.random.normal(jax.random.PRNGKey(config.seed + 1000 + k),
                                                 x.shape), base) for k in range(num_teachers)]
  if len(teachers) != num_teachers:
    raise ConfigError(f'config.teachers.tasks: {len(teachers)} teachers loaded for '
                      f'{num_teachers} declared')
  index = teacher_index(tuple(config.data.tasks), teacher_tasks)

  frozen = {
      'base': base,
      'teachers': stack_adapters(teachers),
      'teacher_cfg': jnp.asarray([config.teachers.tasks[t].cfg_scale for t in teacher_tasks],
                                 jnp.float32),
      'negative': jax.tree.map(jnp.asarray, negative),
  }
  frozen_sh = frozen_shardings(config, mesh, base_state, lora_state, negative)
  frozen = jax.device_put(frozen, frozen_sh)

  if config.student.kind == 'lora':
    student, student_sh = nnx.to_pure_dict(lora_state), shd.state_shardings(lora_state, mesh)
  else:
    student, student_sh = base, frozen_sh['base']
  spec = round_spec(config, policy)
  tx, init_state, state_sh, abstract_state, round_fn = jit_round(
      config, spec, mesh, student, student_sh, frozen_sh, negative)
  return OPDSetup(spec, tx, frozen, frozen_sh, state_sh, init_state, abstract_state, round_fn,
                  mesh, teacher_tasks, index)


def frozen_shardings(config, mesh: Mesh, base_state: nnx.State, lora_state: nnx.State,
                     negative: dict) -> dict:
  """Shardings of the frozen pytree: base and stacked teachers by their logical axes (the
  teacher-slot axis replicated), CFG scales and the empty-prompt embedding replicated."""
  rep = shd.replicated(mesh)
  teacher_state = lora_state if config.teachers.kind == 'lora' else base_state
  return {
      'base': shd.state_shardings(base_state, mesh),
      'teachers': shd.state_shardings(teacher_state, mesh, leading=1),
      'teacher_cfg': rep,
      'negative': jax.tree.map(lambda _: rep, negative),
  }


def batch_shardings(mesh: Mesh, negative: dict) -> dict:
  """Shardings of one round's batch: conditioning [M, B, ...] split over B, teacher slots
  replicated (`negative` gives the conditioning's structure and ranks)."""
  return {'cond': jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x) + 1, 1), negative),
          'teacher': shd.replicated(mesh)}


def jit_round(config, spec: RoundSpec, mesh: Mesh, student: Any, student_shardings: Any,
              frozen_sh: dict, negative: dict):
  """Optimizer, train-state factory, state shardings, abstract state and the jitted round
  (state donated). `student` may be arrays or ShapeDtypeStructs (then only the abstract state
  and the round, e.g. to compile ahead of time, are of use)."""
  rep = shd.replicated(mesh)
  tx = make_optimizer(config.optimizer, config.train.num_steps)
  init_state, state_sh, abstract_state = sharded_train_state(student, student_shardings, tx,
                                                             config.seed, rep)
  round_fn = jax.jit(make_round_fn(spec, tx),
                     in_shardings=(state_sh, frozen_sh, batch_shardings(mesh, negative)),
                     out_shardings=(state_sh, rep), donate_argnums=(0,))
  return tx, init_state, state_sh, abstract_state, round_fn


def device_batch(mesh: Mesh, cond: dict, teacher: np.ndarray) -> dict:
  """Host batch ([M, B_global, ...] on every process) → global arrays sharded over the batch.

  Each process contributes the slice of the batch that its devices own, so the same code runs
  on one host and on multi-host meshes.
  """
  return {'cond': jax.tree.map(lambda x: shd.global_batch_array(mesh, x, 1), cond),
          'teacher': jax.device_put(jnp.asarray(teacher, jnp.int32), shd.replicated(mesh))}
