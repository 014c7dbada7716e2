"""What speculative decoding did in one generation (`SpecStats`): drafts, acceptances, verifications, times and
the drafter. Its field names are `GenerationStats`'s, which takes them over by name (no hand copy)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    drafter: str = "chain"  # "chain", "tree" or "none" (auto chose not to draft)
    accepted_per_step: list[int] = field(default_factory=list)  # drafts accepted by each verification
    drafted_per_step: list[int] = field(default_factory=list)  # drafts (chain) or nodes (tree) each one checked
    undrafted: int = 0  # steps without a draft because drafting did not pay: in a batch too large to gain from it,
    # or while auto's gate measured drafting slower than plain steps (`gate.DraftGate`); one token each
    tree_steps: int = 0  # verifications of a drafted tree (alone or in a batch); the others checked chains or none
    probe_s: float = 0.0  # auto's one-off measurement of the passes' costs, when this generation paid it

    def add_step(self, drafted: int, accepted: int, draft_s: float, verify_s: float, tree: bool = False) -> None:
        """One verification: `drafted` tokens proposed (a chain's, or a tree's nodes with `tree`), the first
        `accepted` of them (or one path) kept, plus the target's own token."""
        self.tree_steps += tree
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.drafted += drafted
        self.accepted += accepted
        self.verifications += 1
        self.accepted_per_step.append(accepted)
        self.drafted_per_step.append(drafted)

    @property
    def emitted(self) -> int:
        """Tokens produced by the verifications: the accepted drafts and one target token each."""
        return self.accepted + self.verifications

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verification(self) -> float:
        """Tokens emitted per verification: 1 + the drafts it accepted, on average."""
        return self.emitted / self.verifications if self.verifications else 0.0
