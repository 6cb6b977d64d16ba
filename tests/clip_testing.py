"""Tiny random reward networks for tests: transformers CLIPs with a tiny byte-level BPE
tokenizer, a LAION-layout aesthetic head, saved as the folders the real rewards read."""

import pathlib

import torch
import transformers
from safetensors.torch import save_file

from opd_jax.tools import convert_clip

PROJ = 16


def tokenizer() -> transformers.CLIPTokenizer:
  """CLIP's byte-level BPE over the 256 byte symbols (alone and word-final) plus two merges;
  <|endoftext|> gets the largest id, as in CLIP's real vocabulary."""
  symbols = ([chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] +
             [chr(c) for c in range(174, 256)] + [chr(256 + i) for i in range(68)])
  vocab = {s: i for i, s in enumerate(symbols)}
  vocab.update({s + '</w>': len(symbols) + i for i, s in enumerate(symbols)})
  for token in ('at</w>', 'cat</w>', '<|startoftext|>', '<|endoftext|>'):
    vocab[token] = len(vocab)
  return transformers.CLIPTokenizer(vocab=vocab, merges=[('a', 't</w>'), ('c', 'at</w>')],
                                    model_max_length=77, pad_token='<|endoftext|>')


def clip_model(tok, act: str, legacy_eos: bool, logit_scale: float, seed: int):
  text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=40, num_hidden_layers=1,
              num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
              eos_token_id=2 if legacy_eos else tok.eos_token_id)
  vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                image_size=224, patch_size=32, hidden_act=act)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=PROJ))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    model.logit_scale.fill_(logit_scale)
  return model.eval()


class Head(torch.nn.Module):
  """LAION's improved-aesthetic-predictor layout (Dropouts between the first Linears)."""

  def __init__(self, dims):
    super().__init__()
    l = torch.nn.Linear
    self.layers = torch.nn.Sequential(
        l(dims[0], dims[1]), torch.nn.Dropout(0.2), l(dims[1], dims[2]), torch.nn.Dropout(0.2),
        l(dims[2], dims[3]), torch.nn.Dropout(0.1), l(dims[3], dims[4]), l(dims[4], dims[5]))


def reward_models(root: pathlib.Path):
  """PickScore-like (gelu, first-EOS rule, own tokenizer), CLIP-L-like (quick_gelu, legacy
  argmax EOS, logit_scale ≠ ln 100, own tokenizer), HPS-like (gelu, legacy EOS, no tokenizer:
  it falls back to the clip folder's), an aesthetic head; and their folders."""
  tok = tokenizer()
  hf = {'pickscore': clip_model(tok, 'gelu', False, 3.1, 0),
        'clip': clip_model(tok, 'quick_gelu', True, 4.5, 1),
        'hpsv2': clip_model(tok, 'gelu', True, 4.6, 2)}
  folders = {}
  for key, model in hf.items():
    folders[key] = str(root / key)
    model.save_pretrained(folders[key])
    if key != 'hpsv2':
      tok.save_pretrained(folders[key])
  torch.manual_seed(3)
  head = Head((PROJ, 12, 8, 6, 4, 1)).eval()
  with torch.no_grad():   # weights large enough that the score follows the embedding
    for p in head.parameters():
      p.normal_(0, 0.6)
  save_file(head.state_dict(), root / 'head.safetensors')
  folders['aesthetic_head'] = str(root / 'head')
  convert_clip.convert_aesthetic_head(root / 'head.safetensors', folders['aesthetic_head'])
  return hf, head, tok, folders
