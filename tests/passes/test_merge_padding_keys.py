"""Pass merge_padding_keys on wan-tiny: every block's text cross-attention becomes key_tail_start +
tail_merged_attention, the tail start found at run time is the prompt's real length (padding present) or
the last key (none), outputs match the graph without the pass, Wan2.1 I2V's image keys are left alone, the
baked sampler computes the tail start once per call, and artifacts round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import turbocompile
from tests.passes._wan_tiny import count_calls, inputs, pass_stats
from tests.passes._wan_tiny import rel_err as _rel
from tests.passes._wan_tiny import recipe as _recipe
from turbocompile.capture import example_inputs
from turbocompile.model.config import get_preset

OPS = torch.ops.turbocompile
PASS = "merge_padding_keys"
CFG = get_preset("wan-tiny")
REAL = 7  # real prompt tokens of the padded context (of text_len 24)


def _stats(res, name=PASS):
    return pass_stats(res, name)


def _padded_inputs(real=REAL):
    args = inputs()
    ctx = args[2].clone()
    ctx[:, real:] = 0  # Wan's padding of a short prompt
    return args[:2] + [ctx] + args[3:]


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the value of every key_tail_start node."""

    def __init__(self, gm):
        super().__init__(gm)
        self.tails = []

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is OPS.key_tail_start.default:
            self.tails.append(out.clone())
        return out


def _tails(gm, args):
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*args)
    return rec.tails


@pytest.mark.parametrize("padded", [True, False])
def test_every_cross_attention_merges_the_padding_and_matches(tmp_path, padded):
    args = _padded_inputs() if padded else inputs()
    base = turbocompile.optimize("wan-tiny", _recipe())
    res = turbocompile.optimize("wan-tiny", _recipe(PASS), verify=True, out=tmp_path / "a")
    assert _stats(res) == {"replaced": CFG.num_layers, "unmatched": 0, "not_text": 0}
    gm = res.graph_module
    assert count_calls(gm, OPS.tail_merged_attention.default) == CFG.num_layers
    assert count_calls(gm, OPS.key_tail_start.default) == CFG.num_layers
    # self-attention keeps its SDPA; no cross-attention SDPA is left
    assert count_calls(gm, torch.nn.functional.scaled_dot_product_attention) == CFG.num_layers
    want = REAL if padded else CFG.text_len - 1  # no padding: the last key is a tail of one
    for t in _tails(gm, args):
        assert t.dtype == torch.int32 and t.shape == (1, CFG.num_heads) and (t == want).all(), t
    with torch.no_grad():
        out, ref = gm(*args), base.graph_module(*args)
    assert _rel(out, ref) < 1e-2  # the bf16 SDPA vs an fp32 softmax, nothing else
    loaded = turbocompile.load(tmp_path / "a", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(*args), out)


def test_merged_equals_explicit_padding_in_float32():
    """float32 graph (ops in bf16 between casts): the merged graph equals the unmerged one to bf16 rounding,
    while dropping the padding instead of merging it would change the output by far more."""
    rec = {"version": 1, "name": "t", "model": {"dtype": "float32", "device": "cpu"}}
    args = [a.float() for a in _padded_inputs(real=3)]
    base = turbocompile.optimize("wan-tiny", {**rec, "passes": []})
    res = turbocompile.optimize("wan-tiny", {**rec, "passes": [PASS]})
    assert any("float32 graph" in n for p in res.manifest["passes"] for n in p.get("notes", []))
    trunc = list(args)
    trunc[2] = args[2].clone()
    trunc[2][:, 4:] = torch.randn_like(trunc[2][:, 4:])  # a different padding: not the same function
    with torch.no_grad():
        ref, out, other = base.graph_module(*args), res.graph_module(*args), base.graph_module(*trunc)
    assert _rel(out, ref) < 1e-2
    assert _rel(other, ref) > 10 * _rel(out, ref)


def test_i2v_image_keys_are_left_alone():
    res = turbocompile.optimize("wan-tiny-i2v", _recipe(PASS))
    layers = get_preset("wan-tiny-i2v").num_layers
    assert _stats(res) == {"replaced": layers, "unmatched": 0, "not_text": layers}
    cfg = get_preset("wan-tiny-i2v")
    args = list(example_inputs(cfg, cfg.video_shape(), seed=1, dtype=torch.bfloat16).values())
    base = turbocompile.optimize("wan-tiny-i2v", _recipe())
    with torch.no_grad():
        assert _rel(res.graph_module(*args), base.graph_module(*args)) < 1e-2


def test_baked_sampler_finds_the_tail_once_per_call():
    """With the turbo stack and the 2-step sampler: one key_tail_start per layer for all steps (it depends on
    the text only), one merged attention per layer and step; same samples as without the pass."""
    w8 = {"name": "w8a8_linear", "options": {"format": "int8", "weight_granularity": "per_channel",
                                             "act_granularity": "per_token"}}
    stack = [w8, "fuse_norms", {"name": "sagesla_attention", "options": {"topk": 0.5}}, "fuse_sibling_gemms"]
    bake = {"name": "bake_rcm_sampler", "options": {"steps": 2, "mode": "ode"}}
    base = turbocompile.optimize("wan-tiny", _recipe(*stack, bake))
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, PASS, bake))
    gm = res.graph_module
    assert count_calls(gm, OPS.key_tail_start.default) == CFG.num_layers
    assert count_calls(gm, OPS.tail_merged_attention.default) == 2 * CFG.num_layers
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(inputs()[0].shape, generator=g)  # the sampler's noise has the latent's shape
    ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g).to(torch.bfloat16)
    ctx[:, REAL:] = 0
    tails = _tails(gm, [noise, ctx])
    assert len(tails) == CFG.num_layers and all((t == REAL).all() for t in tails)
    with torch.no_grad():
        assert _rel(gm(noise, ctx), base.graph_module(noise, ctx)) < 2e-2
