"""Character ends of tokens: the fast offset path equals the prefix-decoding definition."""

from __future__ import annotations

from autopatch.prompts import PromptFormat
from autopatch.tokens import _ends_from_offsets, _ends_from_prefixes, token_char_ends
from eval.twohop import generate_twohop
from tests.tiny_models import byte_tokenizer


def test_offset_path_matches_prefix_decoding():
    tok = byte_tokenizer()
    for record in generate_twohop("test")[:20]:
        ids = tok(PromptFormat().render(record.question)).input_ids + [tok.eos_token_id]
        fast = _ends_from_offsets(tok, ids)
        assert fast is not None and fast == _ends_from_prefixes(tok, ids)


class _SplitsDifferently:
    """Decodes like the byte tokenizer but re-encodes "ab" as one (fictional) token id."""

    def __init__(self):
        self.inner = byte_tokenizer()
        self.all_special_ids = self.inner.all_special_ids

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)

    def __call__(self, text, **kwargs):
        encoded = self.inner(text, **kwargs)
        encoded["input_ids"] = [999] * (len(encoded["input_ids"]) - 1)
        return encoded


class _NoOffsets(_SplitsDifferently):
    def __call__(self, text, **kwargs):
        raise NotImplementedError("return_offsets_mapping is not available with slow tokenizers")


def test_ids_that_do_not_round_trip_fall_back_to_prefix_decoding():
    ids = byte_tokenizer()("Paris").input_ids
    for tok in (_SplitsDifferently(), _NoOffsets()):
        assert _ends_from_offsets(tok, ids) is None
        assert token_char_ends(tok, ids) == _ends_from_prefixes(tok, ids) == [1, 2, 3, 4, 5]


def test_special_tokens_take_the_previous_end():
    tok = byte_tokenizer()
    ids = [tok.bos_token_id, *tok("ab").input_ids, tok.eos_token_id]
    assert token_char_ends(tok, ids) == _ends_from_prefixes(tok, ids) == [0, 1, 2, 2]
