"""diffusers ``WanTransformer3DModel`` layout ↔ canonical (``wan-architecture.md`` §2c).

Renames are prefix rewrites, applied at top level or after ``blocks.<i>.``. Note the norm
swap: the affine cross-attention norm is canonical ``norm3`` but diffusers ``norm2`` (the FFN
norm has no parameters on either side), and the head modulation is the TOP-LEVEL
``scale_shift_table`` while ``blocks.<i>.scale_shift_table`` is the block modulation.
The patch weight is a Conv3d on the diffusers side. Fused projections (``to_qkv``,
``to_kv``, ``to_added_kv``, present only after ``fuse_projections()``) duplicate the
separate ones and are dropped; so is ``norm_added_q`` (diffusers ignores it on load).
"""

from __future__ import annotations

import torch

from turbocompile.checkpoints.original import PATCH_KEY, patch_weight_to_conv, patch_weight_to_linear

__all__ = ["is_diffusers", "diffusers_to_canonical", "canonical_to_diffusers", "config_from_diffusers"]

# (canonical prefix, diffusers prefix); longest prefixes first within each table is not needed
# because no prefix of one entry is a prefix of another in the same table.
_TOP = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
)
_BLOCK = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
)
_DROPPED = (".to_qkv.", ".to_kv.", ".to_added_kv.", ".norm_added_q.")
_MARKERS = ("condition_embedder.", "proj_out.", ".attn1.", ".attn2.", ".ffn.net.")


def is_diffusers(keys) -> bool:
    return any(m in k or k.startswith(m) for k in keys for m in _MARKERS)


def _rename(key: str, table, src: int) -> str:
    dst = 1 - src
    for pair in table:
        if pair[src].endswith("."):
            if key.startswith(pair[src]):
                return pair[dst] + key[len(pair[src]):]
        elif key == pair[src]:
            return pair[dst]
    return key


def _convert_key(key: str, src: int) -> str:
    """src = 1: diffusers → canonical; src = 0: canonical → diffusers. Unknown keys pass through."""
    if key.startswith("blocks."):
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            return f"blocks.{parts[1]}." + _rename(parts[2], _BLOCK, src)
        return key
    return _rename(key, _TOP, src)


def diffusers_to_canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if any(d in key for d in _DROPPED):
            continue
        out[_convert_key(key, 1)] = value
    if PATCH_KEY in out:
        out[PATCH_KEY] = patch_weight_to_linear(out[PATCH_KEY])
    return out


def canonical_to_diffusers(sd: dict[str, torch.Tensor], patch_size=(1, 2, 2)) -> dict[str, torch.Tensor]:
    out = {_convert_key(k, 0): v for k, v in sd.items()}
    if PATCH_KEY in out:
        out[PATCH_KEY] = patch_weight_to_conv(out[PATCH_KEY], patch_size)
    return out


def config_from_diffusers(cfg: dict, name: str = "custom"):
    """WanConfig from a diffusers ``config.json`` dict (or ``module.config``)."""
    from turbocompile.errors import CheckpointError
    from turbocompile.model.config import WanConfig

    try:
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("attention_head_dim", 128))
        in_dim = int(cfg.get("in_channels", 16))
        out_dim = int(cfg.get("out_channels") or in_dim)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"diffusers config lacks a valid {exc}; need num_attention_heads, "
                              "attention_head_dim, in_channels, out_channels") from None
    if not cfg.get("cross_attn_norm", True):
        raise CheckpointError("diffusers config has cross_attn_norm=False; Wan models (and WanModel) "
                              "need the affine cross-attention LayerNorm")
    qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        raise CheckpointError(f"diffusers config qk_norm={qk_norm!r} is not supported; "
                              "only 'rms_norm_across_heads' (Wan's q/k RMSNorm over all heads)")
    if cfg.get("pos_embed_seq_len"):
        raise CheckpointError("diffusers config has pos_embed_seq_len (Wan2.1 FLF2V image position "
                              "embedding), which WanModel does not support")
    image_dim = cfg.get("image_dim")
    has_image = image_dim is not None or cfg.get("added_kv_proj_dim") is not None
    extra = {"image_dim": int(image_dim)} if image_dim is not None else {}
    return WanConfig(
        name=name, model_type="i2v" if in_dim != out_dim else "t2v",
        dim=heads * head_dim, ffn_dim=int(cfg.get("ffn_dim", 13824)), num_heads=heads,
        num_layers=int(cfg.get("num_layers", 40)), in_dim=in_dim, out_dim=out_dim,
        text_dim=int(cfg.get("text_dim", 4096)), freq_dim=int(cfg.get("freq_dim", 256)),
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), eps=float(cfg.get("eps", 1e-6)),
        has_image_input=has_image, **extra,
    )
