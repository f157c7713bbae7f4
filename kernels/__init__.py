"""Pure-torch math of the pack: objectives, PGD, purifiers, metrics.

Nothing in this package imports ComfyUI; it is tested on its own with tiny models and the
real fixtures. Each paper's math lives in one module named after its idea.
"""
