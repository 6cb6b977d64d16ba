"""Runs `python -m opd_jax.main` in a subprocess for the CLI tests.

The child sees `devices` forced host devices (the parent's conftest sets 8 for in-process
tests; the other XLA flags — the faster-compiling CPU kernel emitters among them, xla_testing.py
— and the compilation cache carry over) and, like a user, the repository root as its working
directory. `ForkServer` runs many short command lines (the one-line user errors) in
children forked from one process that imported the libraries once.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(config: str, workdir, *args: str) -> list[str]:
  return [sys.executable, '-m', 'opd_jax.main', f'--config={config}', f'--workdir={workdir}',
          *args]


def child_env(devices: int = 1) -> dict:
  """This environment (conftest.py's XLA flags, the older CPU kernel emitters among them, and
  compilation cache) with `devices` devices."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices}')
  return dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu')


def run_main(config: str, workdir, *args: str, devices: int = 1,
             timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(config, workdir, *args), cwd=ROOT, env=child_env(devices),
                        capture_output=True, text=True, timeout=timeout)


# The fork server: a process that imports the heavy libraries once and then runs each command
# line `python -m MODULE ARGS` in a forked child, the way `python -m` runs it (runpy, as
# __main__), with the request's environment, working directory and output files. The modules run
# as commands (they define their absl flags at import) are never imported by the server itself.
_SERVER = r'''
import json, os, runpy, signal, sys, traceback
for name in sys.argv[1:]:
  __import__(name)
for line in sys.stdin:
  req = json.loads(line)
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      os.chdir(req['cwd'])
      os.environ.clear()
      os.environ.update(req['env'])
      for fd, path in ((1, req['stdout']), (2, req['stderr'])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
      os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
      signal.alarm(req['timeout'])    # the default action of SIGALRM ends a hung child
      sys.argv = [req['module'], *req['args']]
      try:
        runpy.run_module(req['module'], run_name='__main__', alter_sys=True)
        code = 0
      except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
          code = e.code or 0
        else:
          print(e.code, file=sys.stderr)
      except BaseException:
        traceback.print_exc()
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  _, status = os.waitpid(pid, 0)
  print(json.dumps({'returncode': os.waitstatus_to_exitcode(status)}), flush=True)
'''
# Libraries every command imports (jax, flax, …) and the package's modules that define no flags.
PRELOAD = ('numpy', 'jax', 'jax.numpy', 'flax.nnx', 'optax', 'orbax.checkpoint', 'ml_collections',
           'absl.app', 'tqdm', 'safetensors.numpy', 'opd_jax.trainers', 'opd_jax.opd.trainer',
           'opd_jax.rl.trainer', 'opd_jax.parallel.distributed', 'opd_jax.models.vae')


class ForkServer:
  """Runs `python -m` command lines in children forked from one warm process (one at a time;
  make one server per concurrent caller). `run` returns a CompletedProcess as subprocess.run
  does: the child's own exit status, stdout and stderr."""

  def __init__(self, env: dict):
    self._proc = subprocess.Popen([sys.executable, '-c', _SERVER, *PRELOAD], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def run(self, module: str, args, env: dict, out_dir, timeout: int = 600):
    out, err = os.path.join(out_dir, 'stdout.txt'), os.path.join(out_dir, 'stderr.txt')
    request = {'module': module, 'args': list(args), 'env': env, 'cwd': ROOT, 'stdout': out,
               'stderr': err, 'timeout': timeout}
    self._proc.stdin.write(json.dumps(request) + '\n')
    self._proc.stdin.flush()
    reply = self._proc.stdout.readline()
    if not reply:
      raise RuntimeError(f'the fork server died (exit {self._proc.wait()})')
    with open(out) as f_out, open(err) as f_err:
      return subprocess.CompletedProcess([module, *args], json.loads(reply)['returncode'],
                                         f_out.read(), f_err.read())

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)
