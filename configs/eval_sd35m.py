"""Table 1 evaluation of SD3.5-Medium models (spec §4): `python -m opd_jax.evaluate --config=...`.

    python -m opd_jax.evaluate --config=configs/eval_sd35m.py \
        --config.model_dir=/models/sd3.5-medium \
        --config.models.student=runs/opd/student_peft \
        --config.benchmarks.geneval.embeddings=/data/prompt_cache ...

Every model is sampled with the 40-step Euler ODE at 512 px and its own CFG (4.5), image i of a
benchmark from key fold_in(seed, i); then scored: GenEval 553 × 4 images (detector service +
CLIP-L colours), OCR 1018, DrawBench 200 × 5 with PickScore, CLIPScore, HPSv2.1 and the LAION
aesthetic predictor. The prompt files are read by path (the formats of shared/data/eval_prompts);
the prompt embeddings come from a cache of `opd_jax.tools.encode_prompts` made from the same file
(`task:split=path`), checked line by line against it. A benchmark whose `prompts` is '' is skipped;
`limit` > 0 takes its first lines only (a quick look, not a Table 1 number).
"""

import ml_collections


def benchmark(task: str, rewards: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'prompts': '',          # the prompt file (path)
      'embeddings': '',       # encode_prompts cache dir (task/split below) or an .npz
      'task': task, 'split': 'test',
      'limit': 0,
      'rewards': ','.join(rewards),
  })


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_dir = ''                    # diffusers SD3.5-Medium pipeline folder
  # name → adapter: '' (the base model), a PEFT folder (e.g. a run's student_peft, EMA weights
  # when the run used EMA) or a diffusers LoRA .safetensors file.
  c.models = ml_collections.ConfigDict({'base': ''})
  c.cfg = 4.5                         # every model's CFG unless model_cfg names it
  c.model_cfg = ml_collections.ConfigDict({})
  c.sampling = ml_collections.ConfigDict({
      'steps': 40, 'resolution': 512, 'shift': 0.0,   # shift 0: the pipeline scheduler's own
      'seed': 0, 'batch_size': 8,     # global batch, a multiple of the mesh's data axis
      'dtype': 'bfloat16',
  })
  c.benchmarks = ml_collections.ConfigDict({
      'geneval': benchmark('geneval'),
      'ocr': benchmark('ocr'),
      'drawbench': benchmark('drawbench', ('pickscore', 'clipscore', 'hpsv2', 'aesthetic')),
  })
  # Reward weights: HF-format folders (opd_jax.tools.convert_clip makes HPSv2.1's and the
  # aesthetic head's from their released files).
  c.rewards = ml_collections.ConfigDict({
      'pickscore': '',                # yuvalkirstain/PickScore_v1 (CLIP-H) + its processor
      'clip': '',                     # openai/clip-vit-large-patch14: CLIPScore, the aesthetic
                                      # predictor's backbone, GenEval's colour classifier
      'hpsv2': '',                    # HPSv2.1 converted to an HF CLIP folder
      'aesthetic_head': '',           # the LAION aesthetic MLP converted
      'batch_size': 16,
      'ocr_backend': 'rapidocr',      # 'rapidocr' (in-process) or 'http' (ocr_url)
      'ocr_url': 'http://127.0.0.1:18090/ocr',
  })
  c.geneval = ml_collections.ConfigDict({
      'detector_url': 'http://127.0.0.1:8085',   # opd_jax.eval.detector_service
      'timeout_s': 300.0, 'retries': 2,
  })
  c.mesh = ml_collections.ConfigDict({'shape': {'data': -1}})
  c.out_dir = 'runs/eval'
  c.grid_images = 16                  # images per cell in its grid PNG
  return c
