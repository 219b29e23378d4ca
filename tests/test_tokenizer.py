"""Tests for pretrain/data/tokenizer.py: framing and cleaning on hand-worked cases, and id-for-id
parity with open_clip's tokenizer (run in the torch environment) on captions chosen to exercise
cleaning, Unicode, BPE and truncation corner cases."""

import json
import pickle

import numpy as np
import pytest
from torch_env import require_torch_env, run_torch_script

from pretrain.data.tokenizer import (
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    VOCAB_SIZE,
    ClipTokenizer,
    clean_caption,
)

# "cat" is a single BPE token, so n repetitions encode to exactly n ids: with SOT and EOT, 75 ids
# fill a 77-long row exactly and 76 ids are one too many.
EXACT_FIT_CAPTION = " ".join(["cat"] * 75)
ONE_TOO_MANY_CAPTION = " ".join(["cat"] * 76)

MARKET_SENTENCE = (
    "A busy street market at dusk, where vendors sell ripe mangoes, spiced nuts, hand-woven "
    "baskets and bright silk scarves while children chase pigeons past a fountain and an old man "
    "plays the accordion beside a bicycle loaded with 12 crates of oranges."
)
VERY_LONG_CAPTION = " ".join([MARKET_SENTENCE] * 10)  # about 420 words

PARITY_CAPTIONS = [
    # plain and case
    "a photo of a cat",
    "A Photo Of A CAT",
    "DON'T STOP BELIEVING, IT'S WE'LL THEY'RE I'VE I'M HE'D",
    # punctuation and numbers
    "Hello, world! How's it going? I'm fine; you'll see -- they've done it...",
    "!!!???...,,,;;;::: ((nested [brackets] {braces})) <angle> 'single' \"double\"",
    "#hashtag @user https://example.com/path?q=1&x=2 e-mail: someone@example.org",
    "The year 2023 had 365 days; pi is 3.14159 and the phone number is 555-0123.",
    "x² + y³ = z⁴, ½ cup, Arabic-Indic digits ٣٤٥ and roman Ⅻ",
    # unicode: accents, scripts, emoji, combining marks, special letters
    "Café crème brûlée à la française, naïve façade, smörgåsbord, Ærøskøbing",
    "東京タワーの夜景と富士山",
    "一只猫坐在窗台上看着外面的雨",
    "한국어 캡션 테스트입니다",
    "Привет, мир! Кошка спит на диване.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "ΟΔΥΣΣΕΥΣ and İSTANBUL in capitals",
    "emoji 🐱🐶🎉 party 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "decomposed e\u0301 and n\u0303 accents",
    "zero\u200bwidth and joiner\u200d and soft\u00adhyphen",
    "fullwidth ＡＢＣ１２３ and ﬁne ﬂour ligatures",
    # mojibake that ftfy repairs, and curly quotes it straightens
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "cafÃ© au lait and crÃ¨me brÃ»lÃ©e",
    "“smart quotes” and ‘apostrophes’ — it’s",
    # HTML entities, single and double escaped
    "Tom &amp; Jerry",
    "&lt;b&gt;bold&lt;/b&gt; text",
    "it&#39;s a dog&#x27;s life",
    "fish &amp;amp; chips",
    "&amp;lt;tag&amp;gt; and &quot;quoted&quot; and non&nbsp;breaking",
    "<b>fish &amp;amp;amp; chips</b> &amp;amp;lt;",
    # whitespace
    "  lots   of\n\nspace\tand\ttabs  \r\n",
    "\u00a0non-breaking\u2003em space\u3000ideographic space\u2028line separator",
    "vertical\x0btab form\x0cfeed file\x1cseparator",
    # literal special-token text: open_clip maps it to the SOT/EOT ids
    "<start_of_text> hello <end_of_text>",
    # long words and truncation
    "supercalifragilisticexpialidocious" * 10,
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    VERY_LONG_CAPTION,
    # empty and boundaries
    "",
    "   \n\t  ",
    EXACT_FIT_CAPTION,
    ONE_TOO_MANY_CAPTION,
    " ".join(["cat"] * 74),
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


# ---------------------------------------------------------------- no torch needed


def test_shape_dtype_and_attributes(tokenizer):
    single = tokenizer("a photo of a cat")
    batch = tokenizer(["a", "b", "c"])
    assert single.shape == (1, 77) and single.dtype == np.int32
    assert batch.shape == (3, 77) and batch.dtype == np.int32
    assert tokenizer([]).shape == (0, 77)
    assert ClipTokenizer(context_length=16)("a dog").shape == (1, 16)
    assert (
        (tokenizer.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id)
        == (
            VOCAB_SIZE,
            SOT_TOKEN_ID,
            EOT_TOKEN_ID,
        )
        == (49408, 49406, 49407)
    )


def test_known_ids(tokenizer):
    # Ids of the OpenAI CLIP vocabulary: "a"=320, "photo"=1125, "of"=539, "cat"=2368, "hi"=1883,
    # "there"=997 (each with its end-of-word marker).
    np.testing.assert_array_equal(
        tokenizer("a photo of a cat")[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    )
    np.testing.assert_array_equal(tokenizer("Hi there")[0, :5], [49406, 1883, 997, 49407, 0])


def test_empty_and_whitespace_only(tokenizer):
    expected = np.zeros(77, np.int32)
    expected[:2] = [SOT_TOKEN_ID, EOT_TOKEN_ID]
    np.testing.assert_array_equal(tokenizer("")[0], expected)
    np.testing.assert_array_equal(tokenizer(" \n\t\r ")[0], expected)


def test_sot_eot_and_padding_placement(tokenizer):
    rows = tokenizer(["a photo of a cat", "dog", EXACT_FIT_CAPTION])
    assert (rows[:, 0] == SOT_TOKEN_ID).all()
    np.testing.assert_array_equal(np.argmax(rows == EOT_TOKEN_ID, axis=1), [6, 2, 76])
    assert (rows[0, 7:] == 0).all() and (rows[1, 3:] == 0).all()
    # Exactly one SOT and one EOT per row, everything in the vocabulary.
    assert ((rows == SOT_TOKEN_ID).sum(1) == 1).all() and ((rows == EOT_TOKEN_ID).sum(1) == 1).all()
    assert rows.min() >= 0 and rows.max() < VOCAB_SIZE


def test_truncation_keeps_eot_last(tokenizer):
    truncated = tokenizer(VERY_LONG_CAPTION)[0]
    untruncated = ClipTokenizer(context_length=1000)(VERY_LONG_CAPTION)[0]
    n_ids = int(np.argmax(untruncated == EOT_TOKEN_ID)) - 1
    assert n_ids > 300  # the caption really is far beyond 77 tokens
    assert truncated[76] == EOT_TOKEN_ID
    np.testing.assert_array_equal(truncated[:76], untruncated[:76])

    one_too_many = tokenizer(ONE_TOO_MANY_CAPTION)[0]
    cat = tokenizer("cat")[0, 1]
    np.testing.assert_array_equal(one_too_many, [SOT_TOKEN_ID] + [cat] * 75 + [EOT_TOKEN_ID])
    np.testing.assert_array_equal(tokenizer(EXACT_FIT_CAPTION)[0], one_too_many)


def test_batch_equals_one_by_one(tokenizer):
    batch = tokenizer(PARITY_CAPTIONS)
    one_by_one = np.concatenate([tokenizer(caption) for caption in PARITY_CAPTIONS])
    np.testing.assert_array_equal(batch, one_by_one)
    # Tuples and bytes (as TFDS yields captions) give the same ids.
    np.testing.assert_array_equal(tokenizer(tuple(PARITY_CAPTIONS)), batch)
    np.testing.assert_array_equal(tokenizer([c.encode("utf-8") for c in PARITY_CAPTIONS]), batch)


def test_pickle_round_trip(tokenizer):
    fresh = ClipTokenizer(context_length=32)
    restored = pickle.loads(pickle.dumps(fresh))
    assert restored.context_length == 32
    np.testing.assert_array_equal(restored(PARITY_CAPTIONS), fresh(PARITY_CAPTIONS))
    # A tokenizer that has already built its Rust BPE object still pickles (it is dropped).
    used = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(used(PARITY_CAPTIONS), tokenizer(PARITY_CAPTIONS))


def test_rejects_too_short_context():
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(context_length=2)


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("  A  Photo\n\tof a\r\nCAT  ", "a photo of a cat"),
        ("Tom &amp; Jerry", "tom & jerry"),
        ("fish &amp;amp; chips", "fish & chips"),  # escaped twice, unescaped twice
        # ftfy itself unescapes every level of entities, except in text that contains "<"
        # (it might be HTML), where only the two html.unescape calls act.
        ("&amp;amp;amp;", "&"),
        ("<i>&amp;amp;amp;</i>", "<i>&amp;</i>"),
        ("&lt;b&gt;Bold&lt;/b&gt;", "<b>bold</b>"),
        ("cafÃ©", "café"),  # mojibake repaired by ftfy
        ("“Quoted”", '"quoted"'),  # ftfy straightens curly quotes
        ("non&nbsp;breaking", "non breaking"),  # the unescaped U+00A0 counts as whitespace
        ("", ""),
    ],
)
def test_clean_caption(raw, cleaned):
    assert clean_caption(raw) == cleaned


# ---------------------------------------------------------------- parity with open_clip


@pytest.mark.torch
@pytest.mark.parametrize("context_length", [77, 16])
def test_matches_open_clip(tmp_path, context_length):
    require_torch_env()
    captions_path, ids_path = tmp_path / "captions.json", tmp_path / "ids.npy"
    captions_path.write_text(json.dumps(PARITY_CAPTIONS), encoding="utf-8")
    result = run_torch_script(
        "tokenize_open_clip.py", captions_path, ids_path, str(context_length), timeout=300
    )
    expected = np.load(ids_path)
    n_ids = json.loads(result.stdout.strip().splitlines()[-1])

    # The boundary captions must really sit at the boundary for the test to mean anything.
    assert n_ids[PARITY_CAPTIONS.index(EXACT_FIT_CAPTION)] == 75
    assert n_ids[PARITY_CAPTIONS.index(ONE_TOO_MANY_CAPTION)] == 76
    assert n_ids[PARITY_CAPTIONS.index(VERY_LONG_CAPTION)] > 300

    ours = ClipTokenizer(context_length=context_length)(PARITY_CAPTIONS)
    assert expected.shape == ours.shape == (len(PARITY_CAPTIONS), context_length)
    differs = (ours != expected).any(axis=1)
    mismatched = [caption[:60] for caption, bad in zip(PARITY_CAPTIONS, differs) if bad]
    assert not mismatched, f"ids differ from open_clip for: {mismatched}"
