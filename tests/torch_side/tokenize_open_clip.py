"""Torch-env side of the tokenizer parity test: tokenize captions with open_clip.

Usage: tokenize_open_clip.py CAPTIONS_JSON OUT_NPY [CONTEXT_LENGTH]

Reads a JSON list of strings, tokenizes them with the tokenizer open_clip pairs with ViT-B-16
(its default SimpleTokenizer), and saves the ids as an int64 array (n, context_length) to OUT_NPY.
Also prints the ids' lengths before framing and truncation (json), which tests use to check that
their boundary captions really sit at the boundary.
"""

import json
import sys

import numpy as np
import open_clip


def main() -> None:
    captions_path, out_path = sys.argv[1], sys.argv[2]
    context_length = int(sys.argv[3]) if len(sys.argv) > 3 else 77
    with open(captions_path, encoding="utf-8") as f:
        captions = json.load(f)
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise TypeError(f"expected open_clip's SimpleTokenizer, got {type(tokenizer)}")
    ids = tokenizer(captions).numpy()
    # The module-level open_clip.tokenize must agree with the model's tokenizer.
    if not np.array_equal(ids, open_clip.tokenize(captions, context_length=context_length).numpy()):
        raise AssertionError("open_clip.tokenize and get_tokenizer('ViT-B-16') disagree")
    np.save(out_path, ids)
    print(json.dumps([len(tokenizer.encode(caption)) for caption in captions]))


if __name__ == "__main__":
    main()
