"""A scripted policy for driving the real GRPO tool loop without a trained model (tests, debugging).

`script_policy(trainer, scripts)` replaces the trainer's generation: rollout k (in the order of the first
generation call) emits `scripts[k][t]` at its turn t. Each rollout's first turn must carry a unique marker
`<think>r<k>` so later turns (whose prompts contain the earlier ones) are matched to their rollout.
"""

from __future__ import annotations

import re
from typing import Any

VALID_CALL = '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [10, 10, 80, 80], "source": "image_0"}}</tool_call>'


def script_policy(trainer: Any, scripts: list[list[str]], turn_end: str = "<|im_end|>",
                  assistant_start: str = "<|im_start|>assistant\n") -> None:
    """Make `trainer._generate_single_turn` return the scripted turns (token ids ending with `turn_end`)."""
    tok = trainer.processing_class.tokenizer
    state = {"first": 0}

    def generate(prompt_ids: list, images: Any, multimodal_fields: Any, num_generations: int,
                 has_tool_images: bool = False) -> tuple[list[list[int]], None]:
        out = []
        for ids in prompt_ids:
            text = tok.decode(ids, skip_special_tokens=False)
            m = re.search(r"<think>r(\d+)", text)
            if m is None:
                k, t = state["first"] % len(scripts), 0
                state["first"] += 1
            else:
                k, t = int(m.group(1)), text.count(assistant_start) - 1
            turn = scripts[k][min(t, len(scripts[k]) - 1)]
            out.append(tok(turn + turn_end, add_special_tokens=False)["input_ids"])
        return out, None

    trainer._generate_single_turn = generate
