"""The pack's own exceptions.

ComfyUI shows an exception's type as ``module.QualName``; a custom node's modules are named
after the folder the pack is installed in (``/home/me/ComfyUI/custom_nodes/immunize.kernels...``),
so every class here reports its module as plain ``immunize``: users see
``immunize.ProtectionFailed``, never an install path.
"""

from __future__ import annotations


class ImmunizeError(ValueError):
    """Base class: a clear, actionable message about the user's input or the result."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "immunize"


ImmunizeError.__module__ = "immunize"


class ProtectionFailed(ImmunizeError):
    """The optimiser could not produce a protected image that meets its guarantees (finite,
    within the budget after 8-bit quantisation, actually changed where it may change, finite
    objective losses). Nothing is returned under a success status."""


class NoFaceError(ImmunizeError):
    """A face recogniser was asked to work on an image in which no face was found."""


class EmptyBatchError(ImmunizeError):
    """A node got an image batch with no images in it."""
