"""The input rules of one model version: what the proxy refuses before anything is queued.

They follow TEI's own (empty inputs, the character limit when truncation is off, token-id
lists over ``max_input_length``, ``dimensions``) plus the proxy's limits (MAX_CLIENT_BATCH_SIZE,
MAX_QUEUE_SIZE, MAX_INPUT_CHARS) and what the upstream's kind cannot honour. They need the
upstream's ``/info``, so they belong to a version, not to the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy import errors
from proxy.token_ids import fit_token_ids
from proxy.upstream.base import EmbedInput, EmbedOptions, Upstream, UpstreamInfo

# TEI's MAX_CHAR_MULTIPLIER: with truncation off, inputs over max_input_length * 250
# characters are refused before tokenisation (core/src/tokenization.rs).
TEI_MAX_CHAR_MULTIPLIER = 250


class InputRules:
    def __init__(
        self,
        upstream: Upstream,
        *,
        max_client_batch_size: int,
        max_queue_size: int,
        max_input_chars: int | None,
    ) -> None:
        self._upstream = upstream
        self.max_client_batch_size = max_client_batch_size
        self.max_queue_size = max_queue_size
        self.max_input_chars = max_input_chars
        self.info: UpstreamInfo | None = None
        self.dimension: int | None = None

    def learn(self, info: UpstreamInfo) -> None:
        """The upstream's /info, once it answered."""
        self.info = info
        self.dimension = info.embedding_dimension

    def _auto_truncate(self) -> bool:
        return self.info.auto_truncate if self.info is not None else True

    def effective_truncate(self, options: EmbedOptions) -> bool:
        """Whether the upstream truncates for these options: the request's own choice, else
        the upstream's auto_truncate (so both spell the same cache key)."""
        return options.truncate if options.truncate is not None else self._auto_truncate()

    def _max_chars(self, options: EmbedOptions) -> tuple[int | None, bool]:
        """The character limit for one input, and whether it is TEI's own rule."""
        if self.max_input_chars is not None:
            return self.max_input_chars, False
        truncate = options.truncate if options.truncate is not None else self._auto_truncate()
        if truncate or self.info is None:
            return None, True
        return self.info.max_input_length * TEI_MAX_CHAR_MULTIPLIER, True

    def validate(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> None:
        """Refuse bad input before it can reach the batcher or a neighbour's batch."""
        self.validate_request(inputs, options)
        for item in inputs:
            self.validate_item(item, options)

    def fit(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> Sequence[EmbedInput]:
        """Cut (or refuse) token-id lists over the model's max_input_length."""
        return fit_token_ids(inputs, options, self.info)

    def validate_request(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> None:
        if not inputs:
            raise errors.empty_input()
        limit = self.max_client_batch_size
        if len(inputs) > limit:
            raise errors.batch_too_large(len(inputs), limit)
        queue_limit = self.max_queue_size
        if len(inputs) > queue_limit:
            # It could never be queued, however long the caller waits: not a 429.
            raise errors.validation(
                f"batch size {len(inputs)} > MAX_QUEUE_SIZE={queue_limit}: the proxy never "
                "queues more items than that at once"
            )
        unsupported = self._upstream.unsupported(options)
        if unsupported is not None:
            raise errors.validation(unsupported)
        if options.dimensions is not None:
            if options.dimensions <= 0:
                raise errors.validation("Input validation error: `dimensions` should be positive")
            if self.dimension is not None and options.dimensions > self.dimension:
                raise errors.validation(
                    "Input validation error: `dimensions` should be smaller than the maximum "
                    "embedding dimension."
                )

    def validate_item(self, item: EmbedInput, options: EmbedOptions) -> None:
        n = len(item)
        if n == 0:
            raise errors.empty_input()
        max_chars, tei_rule = self._max_chars(options)
        if max_chars is not None and n > max_chars:
            if tei_rule:
                raise errors.validation(
                    f"Input validation error: `inputs` must have less than {max_chars} "
                    f"characters. Given: {n}"
                )
            raise errors.validation(
                f"Input validation error: `inputs` must have less than {max_chars} "
                f"characters (MAX_INPUT_CHARS). Given: {n}"
            )
