"""TSDF's interruption against IP-Adapter face generation, through real ComfyUI classes: a tiny
random SD1.5-shaped UNet, ComfyUI's own ClipVisionModel (tiny config), the VAE and a tiny random
IP-Adapter written and loaded as a checkpoint (the set-up of tests/test_bridge.py)."""

from __future__ import annotations

import pytest
import torch

from immunize.kernels import tsdf as T
from immunize.kernels.pgd import PGDConfig, protect
from immunize.tests.test_bridge import _load, _write_ipadapter, world  # noqa: F401  (fixtures)
from immunize.tests.test_diffusion_nodes import _bchw, _image, _state, tiny  # noqa: F401
from immunize.tests.test_tsdf import _random_sign

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _objective(world, ip, steps=2):
    from immunize.nodes.tsdf import ImmunizeIPInterruptionObjective

    patcher, cond = world["sd15"]
    with torch.inference_mode():  # as the executor runs nodes
        (objs,) = ImmunizeIPInterruptionObjective.execute(
            model=patcher, vae=world["vae"], clip_vision=world["clip_vision"], ipadapter=ip, prompt=cond,
            ip_scale=3.0, steps=steps, weight=1.0).args
    return objs


# "plus" (Resampler over CLIP's penultimate states, like the face adapters). With the tiny random
# "plain" adapter one of two photos did not move: its generation barely depends on the projected
# embedding, G(x + δ) − G(x) stays below float32 resolution near δ = 0, so the quadratic
# distortion has an exactly-zero gradient there and PGD cannot leave it (measured; real weights
# are not available here to check whether real plain adapters behave so).
@pytest.mark.parametrize("kind", ["plus"])
def test_ip_generation_interruption_beats_noise_and_leaves_models_alone(world, kind):
    """The generation from noise depends on the photo only through its IP-Adapter tokens; the
    protection moves it far more than ±ε noise does (fresh seeds, not those PGD used)."""
    ip = _load(_write_ipadapter(world, "sd15", kind, name=f"tsdf-ip-{kind}.safetensors", seed=3))
    patcher = world["sd15"][0]
    before = _state(patcher)
    ip_before = {k: v.clone() for k, v in ip.state_dict().items()}
    objs = _objective(world, ip)
    clean = _bchw(_image(h=32, w=40, b=2, seed=4)).clone()
    with torch.inference_mode(False):
        generate = objs[0].build().pipelines[0]
        assert isinstance(generate, T.ImagePromptGeneration)
        with torch.no_grad():
            a, b = generate(clean, 5), generate(clean, 5)
            other = generate(clean.flip(0), 5)
        assert a.shape == clean.shape and torch.equal(a, b)  # deterministic for a seed
        assert (a - other).abs().mean() > 0  # and it does read the photo
        res = protect(clean, list(objs), PGDConfig(eps=EPS, step=1 / 255, iterations=40))
        seeds = (1000, 1001, 1002)
        attacked = T.forgery_distortion([generate], clean, res.protected, seeds=seeds)
        noise = T.forgery_distortion([generate], clean, _random_sign(clean, EPS, 0), seeds=seeds)
    curve = [float(r.logs["interruption_ip/distortion"].mean()) for r in res.history]
    print(f"\n[ip interruption, {kind}] L2 protected {attacked.tolist()} vs ±ε noise {noise.tolist()}; "
          f"curve {curve[0]:.2e} → {curve[-1]:.2e}")
    assert (res.protected - clean).abs().max() <= EPS + 1e-6
    assert sum(curve[-2:]) > sum(curve[:2])  # the seed pool alternates two seeds
    assert (attacked > 5.0 * noise).all(), (attacked, noise)
    assert _state(patcher) == before
    assert all(torch.equal(v, ip.state_dict()[k]) for k, v in ip_before.items())


def test_ip_interruption_errors(world):
    from immunize.nodes.tsdf import ImmunizeIPInterruptionObjective

    ip_xl = _load(_write_ipadapter(world, "sdxl", "plain", name="tsdf-ip-xl.safetensors"))
    patcher, cond = world["sd15"]
    with pytest.raises(ValueError):  # an SDXL IP-Adapter on an SD1.5 model
        with torch.inference_mode():
            ImmunizeIPInterruptionObjective.execute(model=patcher, vae=world["vae"], clip_vision=world["clip_vision"],
                                                    ipadapter=ip_xl, prompt=cond, ip_scale=1.0, steps=2, weight=1.0)
    ip = _load(_write_ipadapter(world, "sd15", "plain", name="tsdf-ip-ok.safetensors"))
    with pytest.raises(ValueError, match="CONDITIONING"):
        with torch.inference_mode():
            ImmunizeIPInterruptionObjective.execute(model=patcher, vae=world["vae"], clip_vision=world["clip_vision"],
                                                    ipadapter=ip, prompt=[], ip_scale=1.0, steps=2, weight=1.0)
