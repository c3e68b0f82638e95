"""Near-duplicate pairs by perceptual hash (imagehash's pHash, 64 bits): a pair is a near-duplicate of an earlier one
when its input and its target are each within `filter.dedup_distance` bits of that pair's. Order decides which of
two duplicates stays (the earlier, in path and time order), so the result is deterministic."""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image


def phash(image: np.ndarray) -> str:
    """16 hex digits of the 64-bit perceptual hash of an RGB uint8 image (H, W, 3)."""
    return str(imagehash.phash(Image.fromarray(image)))


def distance(a: str, b: str) -> int:
    """Differing bits of two hashes given as hex."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


class NearDuplicates:
    """The pairs seen so far; `check` says whether a new pair duplicates one of them (and remembers it if not)."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self._seen: list[tuple[str, str, str]] = []  # (input hash, target hash, pair id)

    def check(self, pair: str, input_hash: str, target_hash: str) -> str | None:
        """The id of the earlier pair this one duplicates, or None (then it is remembered)."""
        for seen_input, seen_target, seen_pair in self._seen:
            if (distance(input_hash, seen_input) <= self.max_distance
                    and distance(target_hash, seen_target) <= self.max_distance):  # fmt: skip
                return seen_pair
        self._seen.append((input_hash, target_hash, pair))
        return None
