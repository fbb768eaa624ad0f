"""The PyTorch peers' training steps, each in a process of its own (`python -m jaxsae.bench.peers.<lib>`,
printing one JSON line), and which of them compare with which of our architectures."""

from __future__ import annotations

from typing import NamedTuple

LIBRARIES = ("saelens", "sparsify", "dictionary-learning")


class Peer(NamedTuple):
    name: str  # library-architecture, unique
    library: str  # as given to --compare
    module: str  # python -m target
    architecture: str  # the peer's own architecture


PEERS = (
    Peer("saelens-batchtopk", "saelens", "jaxsae.bench.peers.saelens", "batchtopk"),
    Peer("saelens-jumprelu", "saelens", "jaxsae.bench.peers.saelens", "jumprelu"),
    Peer("saelens-topk", "saelens", "jaxsae.bench.peers.saelens", "topk"),
    Peer(
        "dictionary-learning-batchtopk",
        "dictionary-learning",
        "jaxsae.bench.peers.dictionary_learning",
        "batchtopk",
    ),
    Peer("sparsify-topk", "sparsify", "jaxsae.bench.peers.sparsify", "topk"),
)

# Our architecture -> the peers it is compared with (sparsify has TopK only: it stands in for BatchTopK).
COMPARED = {
    "batchtopk": ("saelens-batchtopk", "dictionary-learning-batchtopk", "sparsify-topk"),
    "jumprelu": ("saelens-jumprelu",),
    "topk": ("sparsify-topk", "saelens-topk"),
    "relu": (),
}

NOTES = {("batchtopk", "sparsify-topk"): "sparsify has TopK only (per-row k, not batch)"}


def peers_for(architecture: str, libraries: tuple[str, ...]) -> list[Peer]:
    """Peers compared with `architecture`, restricted to `libraries`."""
    by_name = {p.name: p for p in PEERS}
    return [by_name[n] for n in COMPARED.get(architecture, ()) if by_name[n].library in libraries]
