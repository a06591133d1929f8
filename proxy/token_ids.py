"""TEI's token limit for pre-tokenised inputs, applied before they are queued.

TEI decodes an id list to text and re-encodes it with truncation to ``max_input_length``
(core/src/tokenization.rs), then refuses what is still longer. Without that limit here, a
client could send a million ids: they would cost a payload TEI refuses (413) or, with the
embedded model, seconds of decoding on the model thread. Cutting or refusing them first keeps
every queued item within the model's length.

An id list of n ids counts as n tokens: that is what the round trip gives for ids a tokenizer
produced (TEI's own /tokenize output), which is how clients get them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from proxy import errors
from proxy.upstream.base import EmbedInput, EmbedOptions, UpstreamInfo

_CHARS_PER_TOKEN = 4  # the usual estimate for English text


def estimate_tokens(item: EmbedInput) -> int:
    """Token ids count exactly; text is estimated at 4 characters a token, since batched
    upstream calls do not say how many tokens each input had (OpenAI's `usage`, capture)."""
    if isinstance(item, list):
        return len(item)
    return max(1, math.ceil(len(item) / _CHARS_PER_TOKEN))


def fit_token_ids(
    inputs: Sequence[EmbedInput], options: EmbedOptions, info: UpstreamInfo | None
) -> Sequence[EmbedInput]:
    """``inputs`` with every id list longer than the upstream's ``max_input_length`` cut to
    it (from the end ``truncation_direction`` drops) when truncation is on, as TEI does; with
    truncation off, TEI's 422 for the first one. Texts are left to the upstream's tokenizer.
    """
    if info is None:
        return inputs
    limit = info.max_input_length
    if not any(type(item) is list and len(item) > limit for item in inputs):
        return inputs  # the common case: nothing to copy
    truncate = options.truncate if options.truncate is not None else info.auto_truncate
    fitted: list[EmbedInput] = []
    for item in inputs:
        if isinstance(item, list) and len(item) > limit:
            if not truncate:
                raise errors.validation(
                    f"Input validation error: `inputs` must have less than {limit} tokens. "
                    f"Given: {len(item)}"
                )
            item = item[-limit:] if options.truncation_direction == "Left" else item[:limit]
        fitted.append(item)
    return fitted
