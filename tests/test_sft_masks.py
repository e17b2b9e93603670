"""Assistant-only labels from our own rendering: exactly the assistant tokens carry labels (prompts, tool
responses, image tokens and padding are masked), checked on rendered text and zoom-trajectory examples."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KNOWZOOM_CACHE", str(tmp_path_factory.getbasetemp() / "kz_model_cache"))
    from pipeline.models import load_processor

    yield load_processor("tiny")
    mp.undo()


def _assistant_texts(messages):
    out = []
    for m in messages:
        if m["role"] == "assistant":
            c = m["content"]
            out.append((c if isinstance(c, str) else "".join(x.get("text", "") for x in c)) + "<|im_end|>\n")
    return "".join(out)


def _labelled_text(batch, tok, row=0):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return tok.decode(ids[labels != -100].tolist(), skip_special_tokens=False)


def training_chat_template() -> str:
    """TRL's Qwen2.5-VL template with {% generation %} markers: the reference our masks are checked against."""
    from pathlib import Path

    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl_training.jinja").read_text(encoding="utf-8")


CONV = [
    {"role": "system", "content": "You answer questions."},
    {"role": "user", "content": "Which index uses red and NIR?\n(A) NDVI\n(B) NDWI"},
    {"role": "assistant", "content": "<think>NDVI uses N and R.</think><tool_call>{\"name\": \"zoom_in\"}</tool_call>"},
    {"role": "tool", "content": "obs_1: zoom of image_0 [0, 0, 56, 56], shown at 224x224."},
    {"role": "assistant", "content": "\n<answer>A</answer>"},
]


def test_text_mask_equals_generation_markers_of_trl_training_template(processor):
    from sft.masks import assistant_mask

    tok = processor.tokenizer
    ids = tok(processor.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]
    ours = assistant_mask(ids, tok)
    ref = tok.apply_chat_template(CONV, chat_template=training_chat_template(), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids
    assert [bool(x) for x in ref["assistant_masks"]] == ours
    assert tok.decode([i for i, m in zip(ids, ours, strict=True) if m]) == _assistant_texts(CONV)


def test_collator_labels_exactly_assistant_tokens_on_zoom_trajectory(processor, tmp_path):
    from fixtures.scenes import make_scenes
    from fixtures.toy import spectral_index_qa

    from pipeline.core.records import read_vqa
    from sft.data import oracle_trajectory
    from sft.masks import ZoomSFTCollator
    from tools.protocol import text_qa_messages
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    scenes = make_scenes(tmp_path, n=1, size=1200, square=48)
    manifest, vqa = scenes.manifest, scenes.vqa
    store = ImageStore.from_manifest(manifest)
    msgs, images, _ = oracle_trajectory(read_vqa([vqa])[0], store, ZoomConfig())
    text_msgs = text_qa_messages(spectral_index_qa(1)[0])
    batch = ZoomSFTCollator(processor)([{"messages": msgs, "images": images},
                                        {"messages": text_msgs, "images": []}])
    tok = processor.tokenizer
    assert _labelled_text(batch, tok, 0) == _assistant_texts(msgs)
    assert _labelled_text(batch, tok, 1) == _assistant_texts(text_msgs)
    ids, labels = batch["input_ids"], batch["labels"]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    expected = sum((im.size[0] // 28) * (im.size[1] // 28) for im in images)  # overview + crop
    assert len(images) == 2 and (ids == image_id).sum() == expected
    assert (labels[ids == image_id] == -100).all()  # image tokens never carry labels
    assert (labels[batch["attention_mask"] == 0] == -100).all()  # padding neither
    # the tool response's text is in the input but not in the labels
    full = tok.decode(ids[0].tolist())
    assert "obs_1: zoom of image_0" in full and "obs_1" not in _labelled_text(batch, tok, 0)
    assert (labels[labels != -100] == ids[labels != -100]).all()


def test_mask_ignores_truncated_and_roleless_segments(processor):
    from sft.masks import assistant_mask

    tok = processor.tokenizer
    text = processor.apply_chat_template(CONV[:3], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut = ids[:-4]  # killed mid-answer: still only assistant tokens are marked
    m = assistant_mask(cut, tok)
    assert sum(m) > 0 and tok.decode([i for i, k in zip(cut, m, strict=True) if k]).startswith("<think>")
    assert assistant_mask([], tok) == []
    assert not any(assistant_mask(tok("no chat markup here")["input_ids"], tok))


def test_last_turn_only_labels_the_answer_turn_alone(processor, tmp_path):
    """loss_turns 'last' (the answer step): the trajectory's zoom turn is context, its answer turn the target; a
    text QA conversation (one assistant turn) keeps its labels."""
    from fixtures.scenes import make_scenes
    from fixtures.toy import spectral_index_qa

    from pipeline.core.records import read_vqa
    from sft.data import oracle_trajectory
    from sft.masks import ZoomSFTCollator, assistant_mask
    from tools.protocol import text_qa_messages
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    tok = processor.tokenizer
    ids = tok(processor.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]
    last = assistant_mask(ids, tok, last_only=True)
    assert tok.decode([i for i, m in zip(ids, last, strict=True) if m]) == "\n<answer>A</answer><|im_end|>\n"

    scenes = make_scenes(tmp_path, n=1, size=1200, square=48)
    msgs, images, _ = oracle_trajectory(read_vqa([scenes.vqa])[0], ImageStore.from_manifest(scenes.manifest),
                                        ZoomConfig())
    text_msgs = text_qa_messages(spectral_index_qa(1)[0])
    examples = [{"messages": msgs, "images": images}, {"messages": text_msgs, "images": []}]
    batch = ZoomSFTCollator(processor, last_turn_only=True)(examples)
    turns = [m for m in msgs if m["role"] == "assistant"]
    assert len(turns) == 2 and "<tool_call>" in str(turns[0]["content"])
    assert _labelled_text(batch, tok, 0) == _assistant_texts(turns[-1:])
    assert _labelled_text(batch, tok, 1) == _assistant_texts(text_msgs)
    full = ZoomSFTCollator(processor)(examples)
    assert (batch["input_ids"] == full["input_ids"]).all()  # the same input, fewer labels
    assert ((batch["labels"] != -100) <= (full["labels"] != -100)).all()


def test_loss_turns_is_checked():
    from sft.config import SFTConfig

    assert any(p.startswith("loss_turns") for p in SFTConfig(text_data=["x"], loss_turns="first").validate())
    assert not any(p.startswith("loss_turns") for p in SFTConfig(text_data=["x"], loss_turns="last").validate())
