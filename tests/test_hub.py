"""opd_jax.models.loading.hub: local paths pass through; hub ids download (mocked: no network)."""

import os

import pytest

from opd_jax.errors import InputError
from opd_jax.models.loading import hub


def test_a_local_path_is_returned_as_is(tmp_path, monkeypatch):
  monkeypatch.setattr('huggingface_hub.snapshot_download',
                      lambda *a, **k: pytest.fail('a local path must not reach the hub'))
  assert hub.resolve_pretrained(str(tmp_path), 'MODEL') == str(tmp_path)


@pytest.mark.parametrize('text,is_id', [
    ('stabilityai/stable-diffusion-3.5-medium', True), ('quanhaol/DiffusionOPD/OCRTeacher', True),
    ('/models/sd35m', False), ('sd35m', False), ('a/../b', False), ('', False)])
def test_hub_ids(text, is_id):
  assert hub.is_hub_id(text) == is_id


def test_a_missing_path_that_is_no_hub_id_names_the_setting():
  with pytest.raises(InputError, match=r'^MODEL: /no/such/folder not found'):
    hub.resolve_pretrained('/no/such/folder', 'MODEL')
  with pytest.raises(InputError, match=r'^MODEL: empty'):
    hub.resolve_pretrained('', 'MODEL')


def test_a_whole_repository_and_a_subfolder(tmp_path, monkeypatch):
  calls = []

  def download(repo_id, allow_patterns=None):
    calls.append((repo_id, allow_patterns))
    os.makedirs(tmp_path / 'snap' / 'OCRTeacher', exist_ok=True)
    return str(tmp_path / 'snap')

  monkeypatch.setattr('huggingface_hub.snapshot_download', download)
  assert hub.resolve_pretrained('org/pipe', 'MODEL',
                                allow_patterns=hub.PIPELINE_FILES) == str(tmp_path / 'snap')
  assert hub.resolve_pretrained('org/adapters/OCRTeacher', 'TEACHERS.text') == str(
      tmp_path / 'snap' / 'OCRTeacher')
  assert calls == [('org/pipe', ['model_index.json', '*/*']),
                   ('org/adapters', ['OCRTeacher/*'])]
  with pytest.raises(InputError, match="TEACHERS.aesthetics: the hub repository org/adapters "
                                       "has no folder 'AesTeacher'"):
    hub.resolve_pretrained('org/adapters/AesTeacher', 'TEACHERS.aesthetics')


def test_a_failed_download_is_one_line_naming_the_setting(monkeypatch):
  def offline(repo_id, allow_patterns=None):
    raise OSError('We have no connection\nor the repo is gated')

  monkeypatch.setattr('huggingface_hub.snapshot_download', offline)
  with pytest.raises(InputError) as e:
    hub.resolve_pretrained('org/pipe', 'MODEL')
  assert str(e.value).startswith('MODEL: org/pipe is not a local path and could not be '
                                 'downloaded from the hub (OSError: We have no connection or')
  assert '\n' not in str(e.value)
