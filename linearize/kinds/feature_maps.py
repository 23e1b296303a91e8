"""Feature maps phi applied per head to rotary q and k before linear attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import PlanError
from ..kernels import hedgehog_features


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(xW + b), softmax(-(xW + b))] per head (Hedgehog, Zhang et al. 2024).

    W starts as the identity so phi begins as a spiky, positive map of the teacher's q/k; the
    output has 2 * feature_dim channels and is always positive (a safe normalizer).
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(num_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_dim))

    def forward(self, x: Tensor) -> Tensor:
        return hedgehog_features(x, self.weight, self.bias)


class EluFeatureMap(nn.Module):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, no parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.elu(x) + 1


class ScaledIdentity(nn.Module):
    """phi(x) = x * scale: plain (unnormalized) GLA on the teacher's q/k."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


FEATURE_MAPS = ("hedgehog", "elu", "identity")


def make_feature_maps(
    name: str, num_heads: int, num_kv_heads: int, head_dim: int, feature_dim: int | None, scale: float
) -> tuple[nn.Module, nn.Module, int]:
    """(phi_q, phi_k, feature size). phi_k acts per key/value head, so states stay per KV head."""
    if name == "hedgehog":
        fd = feature_dim or head_dim
        return HedgehogFeatureMap(num_heads, head_dim, fd), HedgehogFeatureMap(num_kv_heads, head_dim, fd), 2 * fd
    if name == "elu":
        return EluFeatureMap(), EluFeatureMap(), head_dim
    if name == "identity":
        return ScaledIdentity(scale), nn.Identity(), head_dim
    raise PlanError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
