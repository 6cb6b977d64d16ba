"""RL stage entry points by name, and loading trained teachers for OPD.

`run_rl(config, workdir, base)` runs the trainer named by `config.algorithm` ('grpo' or 'nft');
single-task teachers, joint multi-task and cascade baselines all go through it. `load_teachers`
turns saved teacher artifacts into what `opd_setup.build_opd` takes: per-task adapter pytrees
(frozen) and each teacher's own CFG scale (config.teachers.cfg_scales).
"""

from __future__ import annotations

from typing import Callable, Sequence

from opd_jax.mini_world import artifacts
from opd_jax.rl.grpo import run_grpo
from opd_jax.rl.nft import run_nft
from opd_jax.train.probe import Probe

RUNNERS: dict[str, Callable[..., dict]] = {'grpo': run_grpo, 'nft': run_nft}


def run_rl(config, workdir: str, base: str | artifacts.BaseModel, *, mesh=None,
           probe: Probe | None = None) -> dict:
  """Runs the RL trainer `config.algorithm` (see `run_grpo` / `run_nft` for the result dict)."""
  if config.algorithm not in RUNNERS:
    raise ValueError(f'config.algorithm: {config.algorithm!r} is not one of {sorted(RUNNERS)}')
  return RUNNERS[config.algorithm](config, workdir, base, mesh=mesh, probe=probe)


def load_teachers(teacher_dirs: Sequence[str]) -> tuple[list[dict], tuple[float, ...]]:
  """(adapter pytrees, CFG scales) of saved teachers, in the given (task) order.

  All teachers must share one LoRA layout (rank and alpha), since OPD stacks them.
  """
  loaded = [artifacts.load_adapter(d) for d in teacher_dirs]
  layouts = {(a.meta['lora_rank'], a.meta['lora_alpha']) for a in loaded}
  if len(layouts) > 1:
    raise ValueError(f'teachers have different LoRA layouts {sorted(layouts)}; OPD stacks them '
                     'and needs one (fold them with lora.fold_adapter first)')
  return [a.params for a in loaded], tuple(a.cfg_scale for a in loaded)
