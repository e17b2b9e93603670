"""The embedded tiny Qwen2.5-VL: offline deterministic build, cache, loading errors, processor round-trip,
and image placeholder tokens == image features for a prompt image and a tool-returned crop."""

from __future__ import annotations

import json
from typing import Any

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.getbasetemp() / "kz_model_cache"
    monkeypatch_module.setenv("KNOWZOOM_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def tiny(cache):
    from pipeline.models import load_model

    torch.set_num_threads(1)
    return load_model("tiny")


def test_tiny_is_small_qwen2_5_vl_with_qwen_tokens(tiny):
    from pipeline.models import SPECIAL_TOKENS, count_parameters

    model, processor = tiny
    assert model.config.model_type == "qwen2_5_vl"
    assert 500_000 < count_parameters(model) < 1_200_000
    tok = processor.tokenizer
    for t in SPECIAL_TOKENS + ["<tool_call>", "</tool_call>", "<think>", "<answer>"]:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    assert tok.eos_token == "<|im_end|>"
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    # a protocol string round-trips through the byte-level BPE, digits split one by one
    s = '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [12, 3, 456, 78.5], "source": "obs_2"}}</tool_call>'
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]
    assert "<|im_start|>assistant" in processor.chat_template or "message['role']" in processor.chat_template


def test_fixed_instruction_texts_are_one_token_each_and_round_trip(tiny):
    """The tool system prompt (169 tokens of BPE) and the answer instructions cost one position each, inside a
    rendered prompt too; a text that differs from them tokenizes as BPE; `prompt_tokens: false` keeps BPE."""
    from pipeline.models import TinySpec, build_tiny_tokenizer, prompt_token_texts
    from tools.protocol import DEFAULT_INSTRUCTION, build_prompt_messages, system_prompt

    _, processor = tiny
    tok = processor.tokenizer
    assert system_prompt("norm1000") in prompt_token_texts() and DEFAULT_INSTRUCTION in prompt_token_texts()
    for t in prompt_token_texts():
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == t, t
    from pipeline.core.records import VQASample

    sample = VQASample(id="q", images=["a"], question="How many ships?", answer="A", choices=["(A) 1", "(B) 2"],
                       hint="Site: column 7, row 3.")
    messages = build_prompt_messages(sample, frame="norm1000")
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(system_prompt("norm1000")) in ids
    changed = system_prompt("norm1000").replace("very large", "very big")
    assert len(tok.encode(changed, add_special_tokens=False)) > 100
    plain = build_tiny_tokenizer(TinySpec(prompt_tokens=False))
    assert len(plain.encode(system_prompt("norm1000"), add_special_tokens=False)) > 100
    assert len(plain.encode(text, add_special_tokens=False)) > len(ids) + 100


def test_build_is_deterministic_and_cached(tmp_path, cache):
    from safetensors.torch import load_file

    from pipeline.models import build_tiny_model, tiny_model_path

    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    p1 = tiny_model_path()
    mtime = (p1 / "model.safetensors").stat().st_mtime
    assert tiny_model_path() == p1 and (p1 / "model.safetensors").stat().st_mtime == mtime


def test_missing_models_say_they_cannot_be_downloaded(tmp_path, cache):
    from pipeline.core.errors import KnowZoomError, ModelNotFoundError
    from pipeline.models import load_model

    with pytest.raises(ModelNotFoundError, match="cannot be downloaded"):
        load_model("Qwen/Not-A-Real-Model-For-Tests", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(KnowZoomError, match="not found"):
        load_model(str(tmp_path / "nope" / "deeper"))


def test_stage_folder_and_roundtrip_clear_truncation(tmp_path, tiny):
    from pipeline.models import load_model, save_model

    model, processor = tiny
    processor.tokenizer.backend_tokenizer.enable_truncation(max_length=8)  # what an SFT run leaves behind
    save_model(model, processor, tmp_path / "stage" / "model")
    data = json.loads((tmp_path / "stage" / "model" / "tokenizer.json").read_text())
    assert data["truncation"] is None and data["padding"] is None
    cfg = json.loads((tmp_path / "stage" / "model" / "processor_config.json").read_text())
    assert cfg["processor_class"] == "Qwen2_5_VLProcessor"
    m2, p2 = load_model(str(tmp_path / "stage"))  # a stage's output_dir resolves to its model/
    assert len(p2.tokenizer("word " * 50)["input_ids"]) > 8
    assert p2.chat_template == processor.chat_template
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_build_model_stage(tmp_path, cache):
    from pipeline.core.config import load_config
    from pipeline.core.errors import ConfigError
    from pipeline.models import BuildModelConfig
    from pipeline.stages import run_stage

    # the tiny config trains the tokenizer on the build-qa / make-scenes outputs: stand-ins for them here
    corpus = tmp_path / "qa_train.jsonl"
    corpus.write_text("".join(json.dumps({"question": f"Which sensor carries band {i}?", "answer": "Landsat 8"})
                              + "\n" for i in range(50)), encoding="utf-8")
    over = {"output_dir": str(tmp_path / "base"), "corpus_files": [str(corpus)]}
    cfg = load_config(BuildModelConfig, "configs/tiny/build_model.yaml", over)
    summary = run_stage("build-model", cfg)
    assert summary["parameters"] > 500_000 and (tmp_path / "base" / "model" / "config.json").exists()
    bad = {"output_dir": str(tmp_path), "hidden_size": 130}
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(BuildModelConfig, None, bad)
    with pytest.raises(ConfigError, match="corpus_files: .*missing.jsonl does not exist"):
        load_config(BuildModelConfig, None, {"output_dir": str(tmp_path), "corpus_files": [str(tmp_path / "missing.jsonl")]})


def _placeholder_vs_features(model, processor, messages, images):
    text = processor.apply_chat_template(messages, tokenize=False)
    enc = processor(text=[text], images=images, return_tensors="pt")
    n_placeholders = int((enc["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        feats = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_features = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0]
    per_image = [int(g.prod()) // 4 for g in enc["image_grid_thw"]]
    with torch.no_grad():
        model(**enc)  # raises "Image features and image tokens do not match" on a mismatch
    return n_placeholders, n_features, per_image


def test_image_tokens_match_features_for_prompt_image_and_tool_crop(tmp_path, tiny):
    from fixtures.scenes import make_scenes

    from tools.protocol import Episode, ToolCall, build_prompt_messages, tool_message
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    model, processor = tiny
    manifest = make_scenes(tmp_path, n=1, size=1500, square=48).manifest
    store = ImageStore.from_manifest(manifest)
    cfg = ZoomConfig()
    ep = Episode(store, ["scene_0"], cfg)
    overview = ep.initial_observations()[0]
    from pipeline.core.records import VQASample

    sample = VQASample(id="s", images=["scene_0"], question="q?", answer="A", choices=["(A) a", "(B) b"])
    msgs = build_prompt_messages(sample, cfg.frame, sizes=[overview.image.size])
    # prompt image only
    n_tok, n_feat, per = _placeholder_vs_features(model, processor, msgs, [overview.image])
    w, h = overview.image.size
    assert n_tok == n_feat == per[0] == (w // 28) * (h // 28)
    # a thin tool-returned crop (non-square) after a zoom call
    res = ep.execute(ToolCall("zoom_in", {"bbox": [10, 20, 200, 60], "source": "image_0"}))
    assert res.error is None
    crop = res.observation.image
    assert crop.size[0] != crop.size[1]
    msgs2 = msgs + [{"role": "assistant", "content": "<tool_call>{}</tool_call>"}, tool_message(res)]
    n_tok, n_feat, per = _placeholder_vs_features(model, processor, msgs2, [overview.image, crop])
    assert n_tok == n_feat == sum(per)
    # the processor did not resize the tool's images: tokens == shown pixels / 28^2
    assert per == [(w // 28) * (h // 28), (crop.size[0] // 28) * (crop.size[1] // 28)]


def test_rl_final_save_clears_truncation_like_sft(tmp_path, tiny):
    """RL saved its processor with a plain save_pretrained, so a truncation left set on the tokenizer was saved
    with the model; its final save now goes through the shared `save_processor` (issue #17)."""
    from rl.stage import save_final_model

    model, processor = tiny
    processor.tokenizer.backend_tokenizer.enable_truncation(max_length=8)

    class Trainer:  # the members of a transformers Trainer that the final save uses
        processing_class = processor

        def save_model(self, path: str) -> None:
            model.save_pretrained(path)

        def is_world_process_zero(self) -> bool:
            return True

    save_final_model(Trainer(), tmp_path / "model")
    data = json.loads((tmp_path / "model" / "tokenizer.json").read_text())
    assert data["truncation"] is None and data["padding"] is None
    assert (tmp_path / "model" / "chat_template.jinja").read_text() == processor.chat_template


def test_checkpoint_weights_reload_strictly(tmp_path, tiny):
    """The resume loader sft and rl share: a checkpoint's weights are copied in; another architecture raises."""
    import copy

    from pipeline.core.errors import CheckpointMismatchError
    from pipeline.models import load_checkpoint_weights

    model, _ = tiny
    model.save_pretrained(tmp_path / "ck")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    load_checkpoint_weights(other, tmp_path / "ck")
    sd1, sd2 = model.state_dict(), other.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    d = model.config.to_dict()  # the same model with one text layer fewer: its keys are missing
    d["text_config"]["num_hidden_layers"] -= 1
    d["text_config"]["layer_types"] = d["text_config"]["layer_types"][:-1]
    type(model)(type(model.config).from_dict(d)).save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointMismatchError, match="does not match the model"):
        load_checkpoint_weights(other, tmp_path / "small")


def test_a_folder_saved_without_torchvision_loads_from_parts_where_torchvision_is(cache, tmp_path, monkeypatch):
    """On an H200 (torchvision installed, as the gpu extra pins it) `AutoProcessor` refused a model folder that
    `knowzoom build-model` had saved on a CPU host: "Can't load video processor". Such a folder (no video
    processor in it) is loaded from its tokenizer and image processor; a Hugging Face Qwen2.5-VL folder (a legacy
    preprocessor_config.json, which transformers' video processor falls back to) still goes to AutoProcessor.
    torchvision is never installed here, so its presence and the video-processor half of `make_processor` are
    stand-ins that record what they get."""
    import shutil

    import transformers

    import pipeline.models as pm

    folder = pm.resolve_model_path("tiny")
    assert not pm.has_video_processor(folder)
    monkeypatch.setattr(pm, "torchvision_available", lambda: True)
    auto_calls: list[str] = []

    def auto_processor(path, **kwargs):  # what transformers 5.17 raised on the H200 for such a folder
        auto_calls.append(str(path))
        raise OSError(f"Can't load video processor for '{path}'.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", auto_processor)
    made: list[tuple[Any, Any]] = []

    def make_processor(tokenizer, image_processor, template=None):
        made.append((tokenizer, image_processor))
        return pm._processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    monkeypatch.setattr(pm, "make_processor", make_processor)
    processor = pm.load_processor(str(folder))
    assert not auto_calls and len(made) == 1
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == json.loads(
        (folder / "config.json").read_text())["image_token_id"]
    assert type(made[0][1]).__name__ == "Qwen2VLImageProcessorPil"
    hf_layout = tmp_path / "hf_layout"
    shutil.copytree(folder, hf_layout)
    (hf_layout / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor"}))
    assert pm.has_video_processor(hf_layout)
    with pytest.raises(pm.ModelNotFoundError, match="Can't load video processor"):
        pm.load_processor(str(hf_layout))
    assert auto_calls == [str(hf_layout)]
    # the other way round: a folder with a video processor (saved on a GPU host) loads from its parts on a CPU
    # host, where torchvision is absent
    monkeypatch.setattr(pm, "torchvision_available", lambda: False)
    pm.load_processor(str(hf_layout))
    assert auto_calls == [str(hf_layout)] and len(made) == 2


def test_a_folder_without_a_video_processor_loads_for_real(cache, tmp_path):
    """No stand-ins: the tiny model's folder with every description of a video processor taken out (as a CPU
    host saves it) loads here and processes an image. On a host with torchvision (tests/gpu/device_check.sh
    runs this file on the GPU machine) this is the path that failed on the H200."""
    import shutil

    from PIL import Image

    import pipeline.models as pm

    folder = tmp_path / "cpu_saved"
    shutil.copytree(pm.resolve_model_path("tiny"), folder)
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    cfg = json.loads((folder / "processor_config.json").read_text())
    cfg.pop("video_processor", None)
    (folder / "processor_config.json").write_text(json.dumps(cfg))
    assert not pm.has_video_processor(folder)
    processor = pm.load_processor(str(folder))
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (56, 56))],
                    return_tensors="pt")
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == pad).sum()) == int(enc["image_grid_thw"].prod()) // 4
