"""The mini world: a tiny text-to-image world in which the whole DiffusionOPD recipe runs on a CPU.

Three tasks mirror the paper's (spec §1): `composition` (GenEval-like), `text` (OCR-like) and
`aesthetics` (PickScore-like). Modules, one concept each:

- `lexicon`: the words of the world and what they look like (colours, shapes, glyphs, palettes).
- `grammar`: prompt templates, `parse`, and the deterministic train/test prompt splits.
- `tokenizer`: word-level tokenizer with single-character glyph tokens.
- `sprites`: the 3×5 bitmap font and the 5×5 shape sprites.
- `render`: numpy renderer (ground truth and deliberately imperfect pretraining images).
- `tfds_builder`: the `mini_world` TFDS builder (array_record, read with `as_data_source`).

The rewards that score this world live in `opd_jax.rewards`.
"""
