"""Immunize: protect images against diffusion-model misuse, and verify the protection.

ComfyUI loads this package as a custom node pack through the V3 entry point below; the
nodes are imported lazily so `kernels/` stays importable (and testable) without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import ImmunizeExtension

    return ImmunizeExtension()
