"""DCAConfig: the hyper-parameters of Deconfounded Causal Adaptation, validated at construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

GATE_FNS = ("tanh", "identity")
VARIANCES = ("sample", "token")
XG_SPACES = ("head", "hidden")
VARIANCE_SCOPES = ("global", "rank")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass(frozen=True)
class DCAConfig:
    """DCA hyper-parameters (docs/DESIGN.md section 1). L, M, H, L' and alpha default to the paper's values; the
    paper leaves the variance's definition open, and the default (variance="token", xg_space="hidden",
    the released DCA code's) is the one under which alpha = 1 measurably changes X_G (RESULTS.md,
    "Which causal loss").

    adapter_layers (L): number of top decoder layers that get an adapter.
    adapter_len (M): adapter-prompt tokens per layer.
    causal_len (H): the first H adapter tokens form X_G, kept invariant by the causal loss.
    causal_layers (L'): the causal loss averages over the top L' adapted layers; None means L.
    alpha: weight of the causal loss; 0 switches it off.
    gate_fn: "tanh" (g = tanh(gate)) or "identity" (g = gate).
    variance: "sample" (variance of per-sample means) or "token" (per-position variance).
    xg_space: "head" (X_G before o_proj) or "hidden" (after o_proj).
    variance_scope: under data parallelism, "global" takes the variance over the global batch (the
        statistics are all-reduced, so the method does not change with the number of ranks); "rank"
        keeps each rank's own variance.
    """

    adapter_layers: int = 20
    adapter_len: int = 10
    causal_len: int = 2
    causal_layers: Optional[int] = None
    alpha: float = 1.0
    gate_fn: str = "tanh"
    variance: str = "token"
    xg_space: str = "hidden"
    variance_scope: str = "global"

    def __post_init__(self):
        for name in ("adapter_layers", "adapter_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"DCAConfig.{name} must be a positive integer, got {value!r}")
        if not _is_int(self.causal_len) or not 0 <= self.causal_len <= self.adapter_len:
            raise ValueError(
                f"DCAConfig.causal_len must be an integer in [0, adapter_len={self.adapter_len}], "
                f"got {self.causal_len!r}"
            )
        if self.causal_layers is None:
            object.__setattr__(self, "causal_layers", self.adapter_layers)
        if not _is_int(self.causal_layers) or not 1 <= self.causal_layers <= self.adapter_layers:
            raise ValueError(
                f"DCAConfig.causal_layers must be an integer in [1, adapter_layers={self.adapter_layers}], "
                f"got {self.causal_layers!r}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"DCAConfig.alpha must be a number >= 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        for name, allowed in (("gate_fn", GATE_FNS), ("variance", VARIANCES), ("xg_space", XG_SPACES),
                              ("variance_scope", VARIANCE_SCOPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DCAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DCAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DCAConfig got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DCAConfig":
        return cls.from_dict(json.loads(text))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
