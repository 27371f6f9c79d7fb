"""Every checkpoint problem is one line naming the keys / path and the valid choices."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.checkpoints._util import tiny_model
from turbocompile.checkpoints import detect_layout, load_model, load_state_dict, save_original, save_turbodiffusion
from turbocompile.errors import CheckpointError


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_missing_key(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["blocks.1.cross_attn.norm_k.weight"]
    msg = _raises(r"1 missing: blocks\.1\.cross_attn\.norm_k\.weight", load_model, _save(sd, tmp_path / "m.safetensors"))
    assert "unexpected" not in msg and "wan-tiny" in msg


def test_unexpected_key(model, tmp_path):
    sd = {**model.state_dict(), "blocks.0.self_attn.extra.weight": torch.ones(3)}
    _raises(r"1 unexpected: blocks\.0\.self_attn\.extra\.weight", load_model, _save(sd, tmp_path / "u.safetensors"))


def test_misshaped_key(model, tmp_path):
    sd = {**model.state_dict(), "blocks.1.self_attn.q.weight": torch.ones(256, 128)}
    _raises(r"1 mis-shaped: blocks\.1\.self_attn\.q\.weight \(checkpoint \[256, 128\] vs model \[256, 256\]\)",
            load_model, _save(sd, tmp_path / "s.safetensors"))


def test_many_problems_are_counted(model, tmp_path):
    path = save_original(model, tmp_path / "t2v.safetensors")
    msg = _raises(r"18 missing: blocks\.0\.cross_attn\.k_img\.weight, .*\(\+14 more\)", load_model, path,
                  config="wan-tiny-i2v")  # 2 x 5 k_img/v_img/norm_k_img keys + 8 img_emb keys
    assert "1 mis-shaped: patch_embedding.weight (checkpoint [256, 64] vs model [256, 144])" in msg


def test_unknown_file_type(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"\0" * 16)
    msg = _raises(r"unsupported checkpoint file type 'weights\.ckpt'", load_model, path)
    assert ".safetensors" in msg and ".pth" in msg


def test_nonexistent_path(tmp_path):
    _raises(r"does not exist", load_model, tmp_path / "nope.safetensors")
    _raises(r"does not exist", load_state_dict, tmp_path / "nope")


def test_corrupt_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    _raises(r"cannot read safetensors file", load_model, bad)
    pickled = tmp_path / "obj.pth"
    torch.save({"step": 3, "note": "no tensors"}, pickled)
    _raises(r"does not hold a state dict of tensors", load_state_dict, pickled)


def test_empty_directory_and_unknown_layout(tmp_path):
    _raises(r"holds no checkpoint file", load_model, tmp_path)
    _raises(r"cannot tell the checkpoint layout.*expected one of canonical, original", detect_layout,
            {"encoder.weight": torch.ones(2)})
    _raises(r"checkpoint is empty", detect_layout, {})


def test_a14b_without_expert(model, tmp_path):
    for sub in ("high_noise_model", "low_noise_model"):
        save_original(model, tmp_path / sub / "diffusion_pytorch_model.safetensors")
    msg = _raises(r"Wan2\.2 A14B checkpoint", load_model, tmp_path)
    assert "expert='high'" in msg and "expert='low'" in msg
    _raises(r"expert='middle' was given", load_model, tmp_path, expert="middle")
    _raises(r"choose one: expert='high' or expert='low'", load_state_dict, tmp_path)
    _raises(r"not a Wan2\.2 A14B checkpoint", load_model, tmp_path / "high_noise_model", expert="high")


def test_td_int8_without_allow_quantized(model, tmp_path):
    path = save_turbodiffusion(model, tmp_path / "q.pth", quantize_int8=True)
    _raises(r"^checkpoint holds TurboDiffusion int8 weights \(20 linears\): optimize it with a recipe that runs "
            r"the w8a8_linear pass", load_model, path)


def test_bad_dtype_and_source(model):
    _raises(r"dtype 'int8' is not a floating dtype", load_model, model, dtype="int8")
    _raises(r"cannot load a model from a int", load_model, 3)
    _raises(r"expert='high' only applies", load_model, model, expert="high")
