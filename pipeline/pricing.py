"""What a call costs, in integer micro-dollars (no float drift), from its raw usage fields.

Prices are per million tokens, by model family, dated. Cache writes cost 1.25x input (5 min
TTL), cache reads 0.1x input, as Anthropic bills them. The cost-control issue moves the table
into config; this module is the one place that does the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.task import Usage

PRICES_AS_OF = "2026-11-01"


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float

    def cost_micro_usd(self, usage: Usage) -> int:
        # micro-dollars per token = USD per million tokens, so the sums stay exact integers
        # for whole-cent-per-MTok prices; round once at the end.
        total = (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_creation_input_tokens * self.input * 1.25
            + usage.cache_read_input_tokens * self.input * 0.1
        )
        return round(total)


#: Defaults by family (Haiku 4.5+, Sonnet 4.5+, Opus 4.5+ list prices).
DEFAULT_PRICES = {
    "haiku": Price(input=1.0, output=5.0),
    "sonnet": Price(input=3.0, output=15.0),
    "opus": Price(input=5.0, output=25.0),
}


def family_of(model: str) -> str | None:
    for family in DEFAULT_PRICES:
        if family in model:
            return family
    return None


def cost_micro_usd(model: str, usage: Usage) -> int:
    """The cost of one call; 0 for a model with no known price."""
    family = family_of(model)
    return DEFAULT_PRICES[family].cost_micro_usd(usage) if family else 0


def usd(micro: int) -> str:
    """Micro-dollars as the decimal string stored in results (`cost_usd`)."""
    return f"{micro / 1_000_000:.6f}"
