"""User errors and how a command reports them: one line naming the field, file or path.

Everything a user can get wrong — a config value, a missing, corrupt or mismatched file, a bad
prompt file, a run that diverges to NaN — raises a `UserError` subclass whose message starts with
what to fix (`config.rollout.kernel: …`, `/path/to/teacher: …`). The command-line entry points
(`opd_jax.main`, `opd_jax.sample`, `opd_jax.tools.*`) run their work under `report_errors`, which
turns a `UserError` into one `error: …` line on stderr and exit status 1; any other exception is a
bug and keeps its traceback. `Preempted` is not an error: a run stopped by SIGTERM/SIGINT after
saving its state, reported in one line with exit status 0.

This module imports nothing from the package, so every layer can raise these errors.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# Set OPD_TRACEBACK=1 (or pass --traceback to a command) to see tracebacks of user errors too.
TRACEBACK_ENV = 'OPD_TRACEBACK'
_MAX_CHARS = 600


class UserError(Exception):
  """Bad input: the message names the field, file or path to fix."""


class ConfigError(UserError, ValueError):
  """A config field has a value the code cannot run with."""


class InputError(UserError, ValueError):
  """A file or directory that is missing, corrupt, or does not match what the run needs."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced NaN/Inf; the run stopped before saving that state."""


class Preempted(Exception):
  """The run was asked to stop (SIGTERM/SIGINT), finished its step and saved a checkpoint."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def one_line(message: str) -> str:
  """A message on one line: further lines joined with '; ', long ones shortened."""
  parts = [p.strip() for p in str(message).splitlines() if p.strip()]
  text = '; '.join(parts) if parts else '(no message)'
  return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS - 1] + '…'


def parse_absl_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error (a bad, unknown or missing flag: exit status 2).

  The `flags_parser` of the command-line tools whose flags are plain absl flags.
  """
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if show_tracebacks('--traceback' in argv):
      raise
    print(f'error: {one_line(str(e))}', file=sys.stderr, flush=True)
    sys.exit(2)


def config_flag_error(e: Exception, argv: list[str]) -> str:
  """One line naming the --config file or override that failed."""
  from absl import flags
  config = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '?')
  text = str(e).strip()
  if isinstance(e, (AttributeError, KeyError)):   # an override of a field the config lacks
    key = text.strip('"\'')
    for arg in argv:
      name = arg.split('=', 1)[0]
      if name.startswith('--config.') and key in name.split('.'):
        return f'{name}: no field {key!r} in {config}'
  embedded = 'Error whilst parsing config file' in text   # ml_collections appends a traceback
  if isinstance(e, flags.Error) and not embedded:
    return one_line(text)                                 # absl's message names the flag
  if embedded or isinstance(e, OSError):
    text = text.splitlines()[-1].strip()                  # the exception line itself
  else:
    text = f'{type(e).__name__}: {text}'
  return one_line(f'--config={config}: {text}')


def parse_config_flags(argv: list[str], config_flag) -> list[str]:
  """absl flag parsing with one-line errors (a bad flag, override or config file: exit 2).

  The `flags_parser` of the commands that take `--config` (an ml_collections config file flag,
  passed as `config_flag`).
  """
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    if config_flag.value is not None:
      config_flag.value.get  # ml_collections defers a config file's IOError to the first access
    return rest
  except Exception as e:   # flags.Error, or whatever a config file raised while loading
    if show_tracebacks('--traceback' in argv):
      raise
    print(f'error: {config_flag_error(e, argv)}', file=sys.stderr, flush=True)
    sys.exit(2)


def show_tracebacks(flag: bool = False) -> bool:
  return flag or os.environ.get(TRACEBACK_ENV, '') not in ('', '0', 'false', 'False')


@contextlib.contextmanager
def report_errors(traceback: bool = False) -> Iterator[None]:
  """Runs a command's body: user errors → one stderr line + exit 1; preemption → exit 0.

  With `traceback` (or OPD_TRACEBACK=1) user errors propagate with their traceback.
  """
  try:
    yield
  except Preempted as e:
    print(one_line(str(e)), flush=True)
    sys.exit(0)
  except UserError as e:
    if show_tracebacks(traceback):
      raise
    print(f'error: {one_line(str(e))}', file=sys.stderr, flush=True)
    sys.exit(1)
  except KeyboardInterrupt:
    if show_tracebacks(traceback):
      raise
    print('error: interrupted', file=sys.stderr, flush=True)
    sys.exit(130)
