"""A local folder for a model given as a path or as a Hugging Face hub id.

    resolve_pretrained('/models/sd35m', 'MODEL')                          # the folder itself
    resolve_pretrained('stabilityai/stable-diffusion-3.5-medium', 'MODEL',
                       allow_patterns=PIPELINE_FILES)                     # downloaded, cached
    resolve_pretrained('quanhaol/DiffusionOPD/OCRTeacher', 'TEACHERS.text')  # one subfolder

Everything else in opd_jax reads local folders only; this is the one place that may reach the hub
(`huggingface_hub.snapshot_download`, its cache and token: gated repositories such as
SD3.5-Medium need the licence accepted and `hf auth login` or HF_TOKEN). An id with more than two
parts names a subfolder of the repository `owner/name`: only that subfolder is fetched and its
local path returned.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from opd_jax.errors import InputError

# A diffusers pipeline repository's folders (transformer/, vae/, text encoders, tokenizers,
# scheduler/) and its model_index.json — not the single-file checkpoints some repositories
# (SD3.5-Medium's) keep at the top level next to them.
PIPELINE_FILES = ('model_index.json', '*/*')
_HUB_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/[^/]+)*$')


def is_hub_id(text: str) -> bool:
  """`owner/name` or `owner/name/sub/folder` (a path that does not exist locally)."""
  return bool(_HUB_ID.match(text)) and '..' not in text.split('/')


def resolve_pretrained(path_or_id: str, what: str, *,
                       allow_patterns: Sequence[str] | None = None) -> str:
  """A local folder for `path_or_id`, downloading it from the hub when it is not a local path.

  Args:
    path_or_id: an existing local path, or a hub id `owner/name[/subfolder...]`.
    what: the setting's name, for the error line (e.g. 'MODEL', 'config.base.path').
    allow_patterns: files to fetch of a whole repository (e.g. PIPELINE_FILES); a subfolder id
      fetches that subfolder.

  Raises:
    InputError: the path does not exist and is not a hub id, or the download failed (offline,
      unknown or gated repository, missing subfolder) — one line naming `what`.
  """
  path_or_id = os.fspath(path_or_id).strip()
  if not path_or_id:
    raise InputError(f'{what}: empty (a local folder or a hub id owner/name)')
  if os.path.exists(path_or_id):
    return path_or_id
  if not is_hub_id(path_or_id):
    raise InputError(f'{what}: {path_or_id} not found (a local folder, or a hub id owner/name)')
  owner, name, *sub = path_or_id.split('/')
  repo_id, subfolder = f'{owner}/{name}', '/'.join(sub)
  patterns = [f'{subfolder}/*'] if subfolder else (list(allow_patterns) if allow_patterns
                                                     else None)
  try:
    from huggingface_hub import snapshot_download
    local = snapshot_download(repo_id, allow_patterns=patterns)
  except Exception as e:   # the hub's many failure types: offline, gated, unknown, HTTP
    text = ' '.join(str(e).split())[:300]
    raise InputError(f'{what}: {path_or_id} is not a local path and could not be downloaded '
                     f'from the hub ({type(e).__name__}: {text})') from None
  folder = os.path.join(local, subfolder) if subfolder else local
  if not os.path.isdir(folder):
    raise InputError(f'{what}: the hub repository {repo_id} has no folder {subfolder!r}')
  return folder
