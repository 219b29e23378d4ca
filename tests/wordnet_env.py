"""WordNet for the CatLIP tests: skip without it, except in CI (``REQUIRE_WORDNET=1``), where its
absence means the set-up step failed and the tests must fail, not silently skip."""

from __future__ import annotations

import os

import pytest

from pretrain.data.synsets import wordnet


def require_wordnet() -> None:
    """Skip (or, with ``REQUIRE_WORDNET=1``, fail) the calling test when WordNet is missing."""
    try:
        wordnet.load_wordnet()
    except RuntimeError as error:  # says how to install it
        if os.environ.get("REQUIRE_WORDNET") == "1":
            pytest.fail(f"REQUIRE_WORDNET=1 but {error}")
        pytest.skip(str(error))
