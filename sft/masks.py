"""Assistant-only loss masks computed from our own rendering, and the SFT collator that applies them.

Decision (DESIGN.md, "one conflict to design around"): transformers is pinned to 5.17 everywhere, because
vLLM 0.31 (our GPU rollout engine) needs transformers < 5.18, while TRL 1.16 refuses
`assistant_only_loss=True` on image datasets below transformers 5.18. Rather than keep vLLM in a second
environment behind a server, we leave TRL's `assistant_only_loss` off and build the labels ourselves:

- every conversation is rendered by the model's chat template (Qwen2.5-VL's, shipped by TRL as
  `qwen2_5_vl.jinja`, the same for the tiny and the 7B model) and tokenized by the processor, which expands
  each `<|image_pad|>` into the image's feature count;
- the token stream is cut at `<|im_start|>` (a single special token in every Qwen tokenizer); a segment whose
  role header reads `assistant` carries labels from the token after its `assistant\\n` header through its
  `<|im_end|>` and the newline after it (exactly the span TRL's `{% generation %}` markers select in
  `qwen2_5_vl_training.jinja`); system, user and tool segments (prompts, tool responses, image tokens) get -100.

`tests/test_sft_masks.py` checks on rendered examples that exactly the assistant tokens carry labels, and that
on text-only conversations the mask equals the one transformers derives from the training template's
generation markers.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def _decode_one(tokenizer: Any, tid: int) -> str:
    return tokenizer.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def assistant_mask(input_ids: list[int], tokenizer: Any, last_only: bool = False) -> list[bool]:
    """True for the tokens of assistant turns (content + closing `<|im_end|>` + its newline); with `last_only`,
    of the last assistant turn alone (an agent trajectory's answer turn)."""
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    n = len(input_ids)
    mask = [False] * n
    i = 0
    while i < n:
        if input_ids[i] != start_id:
            i += 1
            continue
        # read the role header up to the first newline
        j, header = i + 1, ""
        while j < n and "\n" not in header and input_ids[j] not in (start_id, end_id):
            header += _decode_one(tokenizer, input_ids[j])
            j += 1
        role = header.split("\n", 1)[0].strip()
        k = j
        while k < n and input_ids[k] not in (end_id, start_id):
            k += 1
        if role == "assistant":
            stop = k + 1 if k < n and input_ids[k] == end_id else k
            if stop < n and input_ids[stop] != start_id and _decode_one(tokenizer, input_ids[stop]) == "\n":
                stop += 1
            if last_only:
                mask = [False] * n
            for t in range(j, min(stop, n)):
                mask[t] = True
        i = k if k > i else i + 1
    return mask


def assistant_labels(input_ids: Any, attention_mask: Any, tokenizer: Any, last_only: bool = False) -> Any:
    """Labels tensor: input ids on assistant tokens (the last assistant turn's alone with `last_only`),
    IGNORE_INDEX elsewhere (prompts, tools, images, padding)."""
    import torch

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b].tolist()
        m = torch.tensor(assistant_mask(ids, tokenizer, last_only), dtype=torch.bool)
        m &= attention_mask[b].bool()
        labels[b][m] = input_ids[b][m]
    return labels


class ZoomSFTCollator:
    """Renders chat examples ({"messages", "images"}) with the processor's chat template, tokenizes with images
    (placeholders expanded to feature counts) and builds assistant-only labels (the last assistant turn's
    alone with `last_turn_only`). Right padding."""

    def __init__(self, processor: Any, max_length: int | None = None, last_turn_only: bool = False) -> None:
        self.processor = processor
        self.last_turn_only = last_turn_only
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "right"
        self.max_length = max_length

    def render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        texts = [self.render(ex["messages"]) for ex in examples]
        images = [img for ex in examples for img in (ex.get("images") or [])]
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            from sft.errors import SequenceTooLongError

            raise SequenceTooLongError(
                f"a batch has {batch['input_ids'].shape[1]} tokens > max_length {self.max_length}; raise "
                f"max_length or lower max_pixels (long examples are dropped when the dataset is built)"
            )
        batch["labels"] = assistant_labels(batch["input_ids"], batch["attention_mask"], self.tokenizer,
                                           self.last_turn_only)
        return dict(batch)


__all__ = ["IGNORE_INDEX", "assistant_mask", "assistant_labels", "ZoomSFTCollator"]
