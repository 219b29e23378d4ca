"""CLIP text tokenizer, id-for-id identical to open_clip's default ``SimpleTokenizer``.

open_clip tokenizes a caption in three steps, all reproduced here:

1. cleaning (its default ``clean='lower'``): ``ftfy.fix_text``, ``html.unescape`` twice, collapse
   whitespace runs to one space, strip, lower-case — :func:`clean_caption`;
2. byte-level BPE with the 49,408-token ``bpe_simple_vocab_16e6`` vocabulary — delegated to the
   Rust ``instant-clip-tokenizer`` package, which embeds the same vocabulary, splits words with the
   same regular expression and applies the merges in the same order (it lower-cases again, which is
   a no-op on already lower-cased text, and does none of the other cleaning);
3. framing: ``[SOT] + ids + [EOT]``, zero padded to ``context_length``; a caption that is too long
   keeps its first ``context_length - 2`` ids and ends with EOT at the last position.

The Rust tokenizer object cannot be pickled, so :class:`ClipTokenizer` builds it on first use
and drops it when pickled: grain ships the transform to worker processes by pickling.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ftfy
import numpy as np

VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0
DEFAULT_CONTEXT_LENGTH = 77


def clean_caption(text: str) -> str:
    """open_clip's default ('lower') cleaning: fix mojibake, unescape, squeeze spaces, lower."""
    text = ftfy.fix_text(text)
    # ftfy already unescapes every entity level, but only in text without "<" (it may be HTML);
    # there these two calls remove two levels ("&amp;amp;" -> "&"), exactly like open_clip.
    text = html.unescape(html.unescape(text))
    # str.split() with no argument splits on every Unicode whitespace run and drops the ends.
    return " ".join(text.split()).lower()


def _as_str(text: str | bytes) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class ClipTokenizer:
    """Callable turning captions into int32 open_clip token ids of shape ``(n, context_length)``."""

    vocab_size: int = VOCAB_SIZE
    sot_token_id: int = SOT_TOKEN_ID
    eot_token_id: int = EOT_TOKEN_ID
    pad_token_id: int = PAD_TOKEN_ID

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (SOT, token, EOT): {context_length}")
        self.context_length = context_length
        self._bpe = None  # built lazily: see the module docstring

    def _get_bpe(self) -> Any:
        if self._bpe is None:
            # Imported here so that merely constructing or unpickling a ClipTokenizer stays cheap.
            from instant_clip_tokenizer import Tokenizer

            bpe = Tokenizer()
            if (bpe.start_of_text(), bpe.end_of_text()) != (SOT_TOKEN_ID, EOT_TOKEN_ID):
                raise RuntimeError("instant-clip-tokenizer's vocabulary differs from open_clip's")
            self._bpe = bpe
        return self._bpe

    def __call__(self, texts: str | bytes | Sequence[str | bytes]) -> np.ndarray:
        """Tokenize one caption (-> shape ``(1, context_length)``) or a sequence of captions.

        ``bytes`` are decoded as UTF-8: TFDS and array_record sources yield captions as bytes.
        """
        if isinstance(texts, str | bytes):
            texts = [texts]
        cleaned = [clean_caption(_as_str(text)) for text in texts]
        # Truncation in the Rust code keeps SOT + the first context_length - 2 ids and then appends
        # EOT, which is exactly open_clip's "cut to context_length, overwrite the last with EOT".
        ids = self._get_bpe().tokenize_batch(cleaned, self.context_length)
        return np.asarray(ids, dtype=np.int32).reshape(len(cleaned), self.context_length)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bpe"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length})"
