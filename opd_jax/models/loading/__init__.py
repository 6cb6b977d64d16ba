"""Loading diffusers checkpoints into the NNX models without torch.

  safetensors_io   reading single-file / sharded safetensors folders and config.json
  name_map         NNX parameter paths ↔ diffusers keys, and the layout transposes between them
  place            validating a checkpoint against an abstract state and placing it on devices
  pretrained       `load_mmdit`, `load_vae`: config.json → eval_shape → validate → place
  hub              a local folder for a path or a Hugging Face hub id (the one place that downloads)
"""
