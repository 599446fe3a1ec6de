"""What a formulation needs from each pair, so the data layer can check it before step 1.

A formulation learns only from what differs between the chosen and the rejected side of a pair: the
text (DPO and its relatives), the image (CoPO: the chosen answer on m against the same answer on m'),
either (mDPO, MMedPO), or the one its pair type names (the paper's targeted mix). A pair where nothing
the formulation compares differs trains nothing: its loss sits at a constant (log 2 for DPO) with zero
gradient. Such pairs are errors naming the records (or, with skip_invalid, skipped and counted).

The module says what it needs (`PreferenceModule.pair_needs`); the DataModule reads it from the trainer's
module at setup (or takes it as an argument) and validates every record, and processes m' only for the
records whose m' a loss will score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Signal = Literal["none", "text", "image", "either", "pair_type"]
MprimeUse = Literal["never", "always", "image_pairs"]


@dataclass(frozen=True)
class PairNeeds:
    """signal: what must differ between the sides of a pair; mprime: which records the loss scores on m';
    weight: every record needs a `weighted_score` >= 0 (MMedPO's clinical-relevance weight)."""

    formulation: str
    signal: Signal = "text"
    mprime: MprimeUse = "never"
    weight: bool = False

    def weight_problem(self, score: float | None) -> str | None:
        if not self.weight:
            return None
        if score is None:
            return f"{self.formulation} weights each pair by its weighted_score, and this record has none"
        if score < 0:
            return f"{self.formulation} needs a weighted_score >= 0 (a negative weight reverses the preference), got {score}"
        return None

    def uses_mprime(self, pair_type: str) -> bool:
        return self.mprime == "always" or (self.mprime == "image_pairs" and pair_type == "image")

    def missing_signal(self, pair_type: str, text_differs: bool, image_differs: bool) -> str | None:
        """Why a pair carries no preference signal for this formulation, or None if it carries one."""
        wanted = self.signal if self.signal != "pair_type" else ("image" if pair_type == "image" else "text")
        if wanted == "none":
            return None
        if wanted == "text" and not text_differs:
            return f"{self.formulation} compares the responses, and the rejected response equals the chosen one"
        if wanted == "image" and not image_differs:
            return f"{self.formulation} compares the answer on m and on m', and m' is absent or equals m"
        if wanted == "either" and not (text_differs or image_differs):
            return f"{self.formulation} needs the rejected response or the rejected image to differ; neither does"
        return None


__all__ = ["PairNeeds"]
