"""Numerical comparison metrics: relative error, cosine similarity, SQNR."""

from __future__ import annotations

import math

import torch

__all__ = ["compare", "sqnr_db", "rel_err", "cosine"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64."""
    o, r = out.double(), ref.double()
    denom = r.norm().item()
    num = (o - r).norm().item()
    return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double().flatten(), ref.double().flatten()
    denom = (o.norm() * r.norm()).item()
    return (o @ r).item() / denom if denom > 0 else (1.0 if torch.equal(o, r) else 0.0)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖out − ref‖²); inf when identical."""
    e = rel_err(out, ref)
    return math.inf if e == 0 else -20.0 * math.log10(e)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """All metrics of ``out`` against ``ref`` as a JSON-ready dict."""
    finite = bool(torch.isfinite(out).all().item())
    e = rel_err(out, ref) if finite else math.inf
    return {
        "finite": finite,
        "rel_err": e,
        "cosine": cosine(out, ref) if finite else 0.0,
        "sqnr_db": (math.inf if e == 0 else -20.0 * math.log10(e)) if finite else -math.inf,
    }
