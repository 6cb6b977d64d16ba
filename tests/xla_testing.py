"""XLA's CPU kernel emitters in the tests: the older ones for speed, the default where a test's
tolerance is calibrated to the default's rounding.

XLA's CPU backend writes each fused kernel with its MLIR fusion emitters by default; with
`xla_cpu_use_fusion_emitters=false` it uses the older elemental IR emitters. The HLO passes are
the same — fusion decisions, layouts, buffer assignment, so memory analyses too — only each
kernel's code differs, and with it the last bits of some float results. Measured on the 2-core
VM, compile seconds default → older: a tiny OPD round 14.4 → 5.0, test_mmdit_scan's MMDiT
gradient 22 → 10, 37 small initialisation programs 16 → 7.5; the SD3.5-architecture round of
test_opd_aot 33 → 25 (same temporaries).

conftest.py sets FAST_COMPILE_FLAG for the whole test process, so the command-line children
(`cli_testing.child_env`) and the xdist workers get it too. The tests calibrated to the default
kernels' rounding compile the programs whose results they assert with FUSION_EMITTERS
(`jax.jit(f, compiler_options=FUSION_EMITTERS)`): test_grpo's recomputed log-prob ratio, within
1e-5 of 1 (off by 2.4e-5 with the older emitters), and test_opd_fused's fused-gradient gap,
within twice the reference's own floor (2.2–2.8 times with the older emitters).
"""

FUSION_EMITTERS = {'xla_cpu_use_fusion_emitters': True}
FAST_COMPILE_FLAG = '--xla_cpu_use_fusion_emitters=false'
