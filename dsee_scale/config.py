"""DSEE configuration: plain data, validated once, before any heavy work."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

INIT_METHODS = ("lora", "normal")
SUPPORT_METHODS = ("grebsmo", "grebsmo_released", "magnitude", "random")


@dataclass
class DSEEConfig:
    """What DSEE adds to a frozen model: ΔW = (alpha/rank)·B·A + S on every targeted weight."""

    rank: int = field(default=8, metadata={"help": "rank r of the low-rank update B·A"})
    alpha: float = field(default=16.0, metadata={"help": "scale: the low-rank update is multiplied by alpha/rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    nnz: int = field(default=64, metadata={"help": "entries of the sparse residual S per adapted matrix (|Ω|)"})
    targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "module-name suffixes to adapt; 'name:q,v' adapts only those parts of a fused "
            "projection (GPT-2 c_attn = q,k,v). None: the architecture's default"
        },
    )
    target_regex: str | None = field(
        default=None, metadata={"help": "regex on full module names, instead of targets"}
    )
    init: str = field(
        default="lora",
        metadata={"help": "'lora': A random, B = S = 0 (model unchanged at step 0); 'normal': A, B, S ~ N(0, 0.02) as the released DSEE code"},
    )
    support: str = field(
        default="grebsmo",
        metadata={"help": "how Ω is chosen: grebsmo (the paper's GreBsmo), grebsmo_released (the released code's), magnitude, random"},
    )
    trainable_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module-name suffixes trained in full (the task head). None: 'classifier'/'score' when present"},
    )
    seed: int = field(default=0, metadata={"help": "seed for adapter init and random support"})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"DSEEConfig.rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.nnz, int) or self.nnz < 0:
            raise ValueError(f"DSEEConfig.nnz must be an integer >= 0, got {self.nnz!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DSEEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"unknown DSEE init {self.init!r}: choose one of {', '.join(INIT_METHODS)}")
        if self.support not in SUPPORT_METHODS:
            raise ValueError(
                f"unknown support method {self.support!r}: choose one of {', '.join(SUPPORT_METHODS)}"
            )
        if self.targets is not None and self.target_regex is not None:
            raise ValueError("give DSEEConfig.targets or DSEEConfig.target_regex, not both")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
