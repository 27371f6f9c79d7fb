"""diffusers WanTransformer3DModel → canonical WanModel: same outputs (saved directory and in-memory)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints._util import rel_err
from turbocompile.checkpoints import detect_layout, load_model, load_state_dict, to_diffusers_state_dict
from turbocompile.errors import CheckpointError
from turbocompile.model.wan import sinusoid_freqs

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import Timesteps  # noqa: E402

TOL = 1e-5


def _dif_config(i2v: bool) -> dict:
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=36 if i2v else 16,
               out_channels=16, text_dim=64, freq_dim=256, ffn_dim=640, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
    if i2v:
        cfg.update(image_dim=1280, added_kv_proj_dim=256)
    return cfg


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-zero (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            v = 0.02 * torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                v = v + 1.0
            elif p.ndim >= 2 and "table" not in name:
                v = v * 2.0  # somewhat larger matrices: activations well away from zero
            p.copy_(v)


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def case(request, tmp_path_factory):
    """(diffusers module, saved directory, inputs, diffusers output) for T2V and I2V."""
    i2v = request.param == "i2v"
    torch.manual_seed(0)
    dif = WanTransformer3DModel(**_dif_config(i2v)).eval()
    _randomize(dif, seed=3 if i2v else 2)
    directory = tmp_path_factory.mktemp(f"dif_{request.param}")
    dif.save_pretrained(directory)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    t = torch.tensor([937.0, 250.0])
    # diffusers' I2V attention splits the context at len - 512: the text part must be 512 tokens.
    ctx = torch.randn(2, 512 if i2v else 24, 64, generator=g)
    y = torch.randn(2, 20, 3, 8, 8, generator=g) if i2v else None
    clip = torch.randn(2, 257, 1280, generator=g) if i2v else None
    with torch.no_grad():
        ref = _dif_forward(dif, x, t, ctx, y, clip)
    return dif, directory, (x, t, ctx, y, clip), ref, request.param


def _dif_forward(dif, x, t, ctx, y, clip):
    if y is None:
        return dif(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    return dif(hidden_states=torch.cat([x, y], dim=1), timestep=t, encoder_hidden_states=ctx,
               encoder_hidden_states_image=clip, return_dict=False)[0]


@torch.no_grad()
def _ours(model, args):
    x, t, ctx, y, clip = args
    return model(x, t, ctx, y=y, clip_fea=clip)


def test_saved_directory_matches_diffusers(case):
    dif, directory, args, ref, kind = case
    assert detect_layout(load_state_dict(directory)) == "diffusers"
    model, info = load_model(directory, dtype=torch.float32)
    assert info.layout == "diffusers" and info.source == str(directory)
    assert info.config.name == ("wan-tiny-i2v" if kind == "i2v" else "wan-tiny")
    assert info.config.has_image_input == (kind == "i2v")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert model.time_freqs.device.type == "cpu"
    out = _ours(model, args)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= TOL, f"{kind}: rel err {err:.2e} vs diffusers"


def test_in_memory_module_matches_diffusers(case):
    dif, _, args, ref, kind = case
    model, info = load_model(dif)
    assert info.layout == "diffusers" and info.source == "<in-memory WanTransformer3DModel>"
    assert rel_err(_ours(model, args), ref) <= TOL


def test_only_difference_is_diffusers_fp32_timestep_sinusoid(case, monkeypatch):
    """diffusers builds the timestep sinusoid in fp32 (t·ω rounded in fp32: up to 3e-5 absolute error
    at t≈1000); Wan / TurboDiffusion / WanModel use float64. With that one step made float64,
    the two implementations agree to fp32 round-off."""
    dif, _, args, ref, kind = case

    def sinusoid_f64(self, timesteps):
        arg = timesteps.double()[:, None] * sinusoid_freqs(self.num_channels)[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()

    model, _ = load_model(dif)
    ours = _ours(model, args)
    monkeypatch.setattr(Timesteps, "forward", sinusoid_f64)
    with torch.no_grad():
        ref64 = _dif_forward(dif, *args)
    assert rel_err(ours, ref64) <= 1e-6
    assert rel_err(ref64, ref) > 0  # the fp32 sinusoid really differs at t = 937 / 250


def test_to_diffusers_state_dict_round_trip(case):
    dif, _, args, ref, kind = case
    model, _ = load_model(dif)
    back = WanTransformer3DModel(**_dif_config(kind == "i2v")).eval()
    back.load_state_dict(to_diffusers_state_dict(model), strict=True)
    original = dif.state_dict()
    for key, value in back.state_dict().items():
        assert torch.equal(value, original[key]), key
    with torch.no_grad():
        assert torch.equal(_dif_forward(back, *args), ref)


def test_diffusers_pipeline_directories(case, tmp_path):
    """A pipeline root: ``transformer/`` alone, or ``transformer/`` (high noise) + ``transformer_2/`` (low)."""
    dif, _, args, ref, kind = case
    dif.save_pretrained(tmp_path / "single" / "transformer")
    model, info = load_model(tmp_path / "single")
    assert info.source == str(tmp_path / "single" / "transformer")
    assert rel_err(_ours(model, args), ref) <= TOL
    for sub in ("transformer", "transformer_2"):
        dif.save_pretrained(tmp_path / "a14b" / sub)
    with pytest.raises(CheckpointError, match=r"transformer, transformer_2\) and no expert was given"):
        load_model(tmp_path / "a14b")
    _, info = load_model(tmp_path / "a14b", expert="low")
    assert info.source.endswith("transformer_2") and info.expert == "low" and info.layout == "diffusers"
