"""A compile option for tests: XLA's older CPU kernel emitters, about twice as fast to compile.

XLA's CPU backend writes each fused kernel with its MLIR fusion emitters by default; with
`xla_cpu_use_fusion_emitters=false` it uses the older elemental IR emitters. The HLO passes are
the same — fusion decisions, layouts, buffer assignment, so memory analyses too — only each
kernel's code differs, and with it the last bits of some float results. Measured on the 2-core
VM, compile seconds default → this: a tiny OPD round 14.4 → 5.0, test_mmdit_scan's MMDiT
gradient 22 → 10, 37 small initialisation programs 16 → 7.5; the SD3.5-architecture round of
test_opd_aot 33 → 25 (same temporaries).

It is not set for the whole test process: tests calibrated to the default kernels' rounding fail
with it (test_grpo's recomputed log-prob ratio, within 1e-5 of 1: off by 2.4e-5; test_opd_fused's
fused-gradient gap, within twice the reference's own floor: 2.2–2.8 times). It is set for the
command-line children (`cli_testing.child_env`), which run whole training commands and are
compared only with each other, and per compile where a test builds its own programs and compares
them with each other (`jax.jit(f, compiler_options=FAST_COMPILE)`, `lowered.compile(FAST_COMPILE)`).
"""

FAST_COMPILE = {'xla_cpu_use_fusion_emitters': False}
FAST_COMPILE_FLAG = '--xla_cpu_use_fusion_emitters=false'
