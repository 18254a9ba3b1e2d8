"""What a generation returns: the answer, how it was decided, and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Candidate:
    model: str  # drafter that wrote it
    text: str  # after word-boundary trimming
    ended_with_stop: bool
    draft_tokens: int  # tokens the drafter generated this round


@dataclass
class RoundRecord:
    index: int  # 1-based round number t
    candidates: list[Candidate]
    raw_scores: dict[str, list[float]]  # verifier -> per-candidate mean logprob / logit
    scores: dict[str, list[float]]  # verifier -> normalised across candidates
    weights: dict[str, float]  # Hedge weights used for selection (after this round's update)
    combined: list[float]  # per-candidate weighted score
    winner: int  # index into candidates
    winner_model: str
    seconds: dict[str, float]  # draft / verify / commit
    # What this round added to the answer: the winner's text after stop-string and
    # token-budget cuts. A stop string straddling two segments also shortens the
    # earlier text, so the answer after the round is
    # answer[:answer_chars - len(accepted)] + accepted.
    accepted: str = ""
    answer_chars: int = 0
    drafters: list[str] = field(default_factory=list)  # models that drafted this round (model exit drops some)
    verified: bool = True  # False: accepted without a verify pass (one candidate, agreement, fast_eos)
    # verifier -> each candidate's length in that verifier's tokens (what a summed score
    # multiplies the mean by; kept so a trace can be rescored offline)
    verify_tokens: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class GenerationResult:
    prompt: str
    text: str
    stop_reason: str  # "stop" (a stop token), "stop_string", "length", "fast_eos", "empty", "cache_full"
    new_tokens: int  # answer length in the lead drafter's tokens (the first drafter that has not exited)
    tokens_per_model: dict[str, int]  # answer length in each model's tokens
    rounds: list[RoundRecord]
    timings: dict[str, float]  # draft_s, verify_s, commit_s, total_s, first_segment_s
    settings: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)  # kernel path, device, mode
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # the templated prompt's length in each model's tokens

    @property
    def wins(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rounds:
            counts[r.winner_model] = counts.get(r.winner_model, 0) + 1
        return counts

    @property
    def mean_drafters(self) -> float:
        """Mean number of models that drafted per round."""
        return sum(len(r.drafters) for r in self.rounds) / len(self.rounds) if self.rounds else 0.0

    @property
    def skipped_verify(self) -> int:
        """Rounds accepted without a verify pass."""
        return sum(1 for r in self.rounds if not r.verified)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SingleResult:
    """One model decoding alone (the baseline the ensemble is measured against)."""

    model: str
    prompt: str
    text: str
    new_tokens: int
    stop_reason: str
    seconds: float
    first_token_s: float
    prompt_tokens: int = 0  # the templated prompt's length in the model's tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
