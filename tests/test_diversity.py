"""Input diversity (kernels.diversity): random views are seeded, within their ranges, off at
strength 0, and the gradient still reaches the photo's pixels through them."""

import math

import pytest
import torch

from immunize.kernels.diversity import Diversity
from immunize.kernels.faces import FaceSet, align_faces

TEMPLATE = torch.tensor([[44.75, 44.0], [104.25, 44.0], [74.5, 79.0], [47.0, 104.0], [102.0, 104.0]])


def _eye_distance(t):
    return (t[..., 1, :] - t[..., 0, :]).norm(dim=-1)


def test_templates_are_seeded_and_stay_in_range():
    d = Diversity()
    a = d.templates(TEMPLATE, 150, 500, torch.Generator().manual_seed(0))
    b = d.templates(TEMPLATE, 150, 500, torch.Generator().manual_seed(0))
    c = d.templates(TEMPLATE, 150, 500, torch.Generator().manual_seed(1))
    assert a.shape == (500, 5, 2) and torch.equal(a, b) and not torch.equal(a, c)
    scale = _eye_distance(a) / _eye_distance(TEMPLATE)
    assert scale.min() >= 0.72 - 1e-4 and scale.max() <= 1.4 + 1e-4
    assert scale.min() < 0.76 and scale.max() > 1.35  # the whole range is used
    eyes = a[:, 1] - a[:, 0]
    angle = torch.rad2deg(torch.atan2(eyes[:, 1], eyes[:, 0]))
    assert angle.abs().max() <= 8 + 1e-3 and angle.abs().max() > 7


def test_strength_zero_is_the_exact_template_and_half_strength_narrows():
    off = Diversity(strength=0.0)
    t = off.templates(TEMPLATE, 150, 3, torch.Generator().manual_seed(0))
    assert torch.equal(t, TEMPLATE.expand(3, 5, 2))
    chips = torch.rand(2, 3, 150, 150)
    assert off.resize_chips(chips, torch.Generator()) is chips
    half = Diversity(strength=0.5).templates(TEMPLATE, 150, 500, torch.Generator().manual_seed(0))
    scale = _eye_distance(half) / _eye_distance(TEMPLATE)
    assert scale.min() >= math.sqrt(0.72) - 1e-4 and scale.max() <= math.sqrt(1.4) + 1e-4


def test_gradient_reaches_the_photo_through_random_views():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 200, 220, generator=g, requires_grad=True)
    lm = TEMPLATE + torch.tensor([20.0, 30.0])
    faces = [FaceSet(landmarks=lm[None], boxes=torch.tensor([[20.0, 30, 170, 180]]), probs=torch.ones(1))] * 2
    d = Diversity()
    views = d.templates(TEMPLATE, 150, 2, g)
    chips, owner = align_faces(img, faces, views, 150)
    chips = d.resize_chips(chips, g)
    assert chips.shape == (2, 3, 150, 150) and owner.tolist() == [0, 1]
    chips.pow(2).sum().backward()
    assert torch.isfinite(img.grad).all() and (img.grad[0].abs().sum() > 0) and (img.grad[1].abs().sum() > 0)
    # the two faces saw different views
    assert not torch.allclose(chips[0], chips[1])


def test_an_ensemble_splits_into_one_objective_per_network():
    """Chained, each network's gradient is normalised on its own (an even ensemble)."""
    from immunize.kernels.identity import IdentityObjective

    class Net(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

    a, b, clip = Net("dlib"), Net("mobileface"), Net("clip")
    parts = IdentityObjective(recognizers=[a, b], image_encoders=[clip], diversity=1.0, seed=5).split()
    assert [p.name for p in parts] == ["identity:dlib", "identity:mobileface", "identity:clip"]
    assert [list(p.recognizers) for p in parts] == [[a], [b], []] and list(parts[2].image_encoders) == [clip]
    assert [p.seed for p in parts] == [5, 6, 7] and all(p.diversity == 1.0 for p in parts)
    assert [p.weight for p in parts] == [pytest.approx(1 / 3)] * 3  # together they weigh what the whole did
    single = IdentityObjective(recognizers=[a])
    assert single.split() == [single]
