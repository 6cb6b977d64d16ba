"""The package's layers (README "Layout"): no import from a lower layer up, no import cycle.

Imports are read from the source with `ast` (module-level and function-level alike), so a lazy
import inside a function counts too.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'opd_jax')

# Bottom to top. A module may import from its own layer or any layer below.
LAYERS = [
    {'errors', 'fingerprint', 'flops'},
    {'parallel', 'sampling'},
    {'models'},
    {'objectives', 'mini_world'},
    {'rewards', 'data'},
    {'train'},
    {'opd', 'rl', 'pretrain', 'eval'},
    {'recipe'},
    {'trainers', 'main', 'sample', 'evaluate', 'tools'},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
  for root, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        yield rel.removesuffix('.__init__'), path


MODULES = dict(_modules())


def _imports(path: str, module: str) -> set[str]:
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('opd_jax')}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('opd_jax'):
      # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg.
      for a in node.names:
        sub = f'{node.module}.{a.name}'
        out.add(sub if sub in MODULES else node.module)
  return out


def _top(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def test_every_top_level_name_has_a_layer():
  tops = {_top(m) for m in MODULES} - {''}
  assert tops - set(LEVEL) == set(), 'give every new package or module a layer in LAYERS'


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
  level = LEVEL.get(_top(module), len(LAYERS))
  bad = sorted(m for m in _imports(MODULES[module], module)
               if _top(m) in LEVEL and LEVEL[_top(m)] > level)
  assert not bad, f'{module} (layer {level}) imports from higher layers: {bad}'


def test_no_import_cycles():
  graph = {m: {i for i in _imports(p, m) if i in MODULES} for m, p in MODULES.items()}
  state: dict[str, int] = {}   # 1: on the stack, 2: done

  def visit(m, stack):
    state[m] = 1
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        raise AssertionError('import cycle: ' + ' → '.join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n, stack + [n])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
