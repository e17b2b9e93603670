"""SFT datasets: TextQA chat format, oracle zoom trajectories made with the real tool (frames mapped),
direct answers without a region, resumable materialization, mixing, length filtering, config validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.core.records import TargetRegion, VQASample


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from fixtures.scenes import make_scenes

    out = tmp_path_factory.mktemp("scenes")
    scenes = make_scenes(out, n=4, size=2000, square=40, direct_every=4)
    manifest, vqa = scenes.manifest, scenes.vqa
    return manifest, vqa


def test_text_qa_messages_follow_the_answer_format_the_verifier_reads():
    from fixtures.toy import spectral_index_qa

    from rl.verifier import verify_sample
    from tools.protocol import text_prompt_messages, text_qa_messages

    qa = spectral_index_qa(3)
    for q in qa:
        msgs = text_qa_messages(q)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert all(c in msgs[0]["content"] for c in q.choices)
        target = msgs[1]["content"]
        assert target.startswith("<think>") and target.endswith(f"<answer>{q.answer}</answer>")
        assert verify_sample(target, q).correct
        assert text_prompt_messages(q) == msgs[:1]
    assert "<think>" not in text_qa_messages(qa[0], think=False)[1]["content"]


def test_oracle_trajectory_zooms_onto_the_target_through_the_declared_frame(scenes):
    from pipeline.core.records import read_vqa
    from rl.verifier import verify_sample
    from sft.data import oracle_trajectory
    from tools.protocol import Episode, parse_turn
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    manifest, vqa = scenes
    store = ImageStore.from_manifest(manifest)
    for frame in ("shown_pixels", "norm1000"):
        cfg = ZoomConfig(frame=frame)
        sample = read_vqa([vqa])[0]
        msgs, images, obs = oracle_trajectory(sample, store, cfg)
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
        turn = parse_turn(msgs[2]["content"])
        assert turn.error is None and turn.tool_call is not None and turn.answer is None
        # replaying the model's call on a fresh episode reads a window that contains the target
        ep = Episode(store, sample.images, cfg)
        native = ep.observations["image_0"].frame_to_native(turn.tool_call.arguments["bbox"])
        tx0, ty0, tx1, ty1 = sample.targets[0].bbox
        assert native[0] <= tx0 and native[1] <= ty0 and native[2] >= tx1 and native[3] >= ty1
        assert native[2] - native[0] < 3 * (tx1 - tx0)  # and not much more than it
        assert obs[1].window[0] <= tx0 and obs[1].window[2] >= tx1
        assert len(images) == 2 and images[1].size == obs[1].image.size
        assert verify_sample(msgs[-1]["content"], sample).correct
        user_images = sum(c.get("type") == "image" for c in msgs[1]["content"])
        tool_images = sum(c.get("type") == "image" for c in msgs[3]["content"])
        assert user_images + tool_images == len(images)


def test_direct_answer_without_region_and_zoom_cap(scenes):
    from pipeline.core.records import read_vqa
    from sft.data import oracle_trajectory
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    manifest, vqa = scenes
    store = ImageStore.from_manifest(manifest)
    samples = read_vqa([vqa])
    no_region = next(s for s in samples if not s.targets)
    msgs, images, _ = oracle_trajectory(no_region, store, ZoomConfig())
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and len(images) == 1
    two = VQASample(id="two", images=["scene_0", "scene_1"], question="same colour?", answer="true", qtype="tf",
                    targets=[TargetRegion(0, [0, 0, 100, 100]), TargetRegion(1, [500, 500, 600, 600])])
    msgs, images, obs = oracle_trajectory(two, store, ZoomConfig())
    assert [o.name for o in obs] == ["image_0", "image_1", "obs_1", "obs_2"] and len(images) == 4
    assert '"source": "image_1"' in msgs[4]["content"]
    msgs, images, _ = oracle_trajectory(two, store, ZoomConfig(), max_zooms=1)
    assert len(images) == 3 and sum(m["role"] == "tool" for m in msgs) == 1


def test_materialize_is_resumable_and_skips_rejected_boxes(scenes, tmp_path):
    from pipeline.core.records import Trajectory, read_jsonl, read_vqa
    from sft.data import ChatDataset, materialize_trajectories, trajectory_items
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    manifest, vqa = scenes
    store = ImageStore.from_manifest(manifest)
    samples = read_vqa([vqa])
    bad = VQASample(id="bad", images=["scene_0"], question="?", answer="A", choices=["(A) x", "(B) y"],
                    targets=[TargetRegion(0, [5000, 5000, 5100, 5100])])  # outside the image
    path, stats = materialize_trajectories(samples[:2] + [bad], store, ZoomConfig(), tmp_path, progress=False)
    assert stats == {"written": 2, "skipped_existing": 0, "failed": 1}
    with path.open("a") as f:
        f.write('{"sample_id": "half-writ')  # a kill in the middle of an append
    path, stats = materialize_trajectories(samples, store, ZoomConfig(), tmp_path, progress=False)
    assert stats == {"written": 2, "skipped_existing": 2, "failed": 0}
    recs = list(read_jsonl(path, Trajectory))
    assert sorted(r.sample_id for r in recs) == sorted(s.id for s in samples)
    items = trajectory_items(path)
    row = ChatDataset(items)[0]
    assert len(row["images"]) == len(items[0].image_files) and row["images"][0].mode == "RGB"
    assert items[0].n_image_tokens == sum(im.size[0] * im.size[1] // 784 for im in row["images"])

    # a folder rendered with other settings is refused, never resumed as it is (its lines are kept by sample id)
    from sft.errors import SFTDataError

    for kw, field in [({"zoom_cfg": ZoomConfig(frame="norm1000")}, "zoom"), ({"think": False}, "think"),
                      ({"max_zooms": 1}, "max_zooms")]:
        args = {"zoom_cfg": ZoomConfig(), **kw}
        with pytest.raises(SFTDataError, match=f"{field} differ.*trajectory_dir"):
            materialize_trajectories(samples, store, args.pop("zoom_cfg"), tmp_path, progress=False, **args)
    settings = tmp_path / "trajectories.settings.json"
    assert json.loads(settings.read_text())["oracle_format"] >= 2
    settings.unlink()  # a folder from before the settings were recorded
    with pytest.raises(SFTDataError, match="older version"):
        materialize_trajectories(samples, store, ZoomConfig(), tmp_path, progress=False)
    assert len(list(read_jsonl(path, Trajectory))) == len(samples)  # nothing was removed
    _, stats = materialize_trajectories(samples, store, ZoomConfig(read_timeout_s=3.0), tmp_path / "new",
                                        progress=False)
    assert stats["written"] == len(samples)
    _, stats = materialize_trajectories(samples, store, ZoomConfig(), tmp_path / "new", progress=False)
    assert stats["skipped_existing"] == len(samples)  # the read timeout changes no pixel: resumed


def test_the_written_pngs_hold_the_rendered_pixels_and_a_failed_write_fails_the_build(scenes, tmp_path,
                                                                                       monkeypatch):
    """The crops are written in a background thread at PNG level 1: the same pixels and the same JSONL as at
    PIL's default level; a write that fails stops the build with its error, and no line is appended for a
    sample whose image is not on disk, so the rerun renders it again."""
    import numpy as np
    from PIL import Image

    from pipeline.core.records import Trajectory, read_jsonl, read_vqa
    from sft.data import PNG_COMPRESS_LEVEL, materialize_trajectories, oracle_trajectory
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    manifest, vqa = scenes
    store = ImageStore.from_manifest(manifest)
    samples = read_vqa([vqa])[:4]
    fast, _ = materialize_trajectories(samples, store, ZoomConfig(), tmp_path / "fast", progress=False)
    slow, _ = materialize_trajectories(samples, store, ZoomConfig(), tmp_path / "slow", progress=False,
                                       png_compress_level=6)
    assert PNG_COMPRESS_LEVEL == 1 and fast.read_text() == slow.read_text()
    recs = list(read_jsonl(fast, Trajectory))
    assert len(recs) == 4 and any(t.tool_calls for t in recs)
    for t in recs:
        _, images, _ = oracle_trajectory(next(s for s in samples if s.id == t.sample_id), store, ZoomConfig())
        assert len(images) == len(t.observations)
        for o, im in zip(t.observations, images, strict=True):
            a, b = (np.asarray(Image.open(root / o["file"]).convert("RGB")) for root in (fast.parent, slow.parent))
            assert np.array_equal(a, np.asarray(im.convert("RGB"))) and np.array_equal(a, b)

    save = Image.Image.save

    def failing(self, fp, *args, **kwargs):
        if Path(fp).name.startswith(f"{samples[1].id}_"):
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OSError, match="No space left"):
        materialize_trajectories(samples, store, ZoomConfig(), tmp_path / "full", progress=False)
    assert [t.sample_id for t in read_jsonl(tmp_path / "full" / "trajectories.jsonl", Trajectory)] == [samples[0].id]
    monkeypatch.setattr(Image.Image, "save", save)
    path, stats = materialize_trajectories(samples, store, ZoomConfig(), tmp_path / "full", progress=False)
    assert stats == {"written": 3, "skipped_existing": 1, "failed": 0} and path.read_text() == fast.read_text()


def test_first_zoom_examples_cut_each_zooming_trajectory_after_its_first_call(scenes, tmp_path):
    from pipeline.core.records import read_vqa
    from sft.data import ChatDataset, materialize_trajectories, trajectory_items
    from tools.protocol import parse_turn
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    manifest, vqa = scenes
    samples = read_vqa([vqa])
    # a change pair: the same site zoomed in image_0, then in image_1
    s = next(x for x in samples if x.targets)
    pair = dataclasses.replace(s, id=s.id + "-pair", images=[s.images[0], s.images[0]],
                               targets=[dataclasses.replace(s.targets[0], image=k) for k in (0, 1)])
    path, _ = materialize_trajectories(samples + [pair], ImageStore.from_manifest(manifest), ZoomConfig(),
                                       tmp_path, progress=False)
    whole = trajectory_items(path)
    both = trajectory_items(path, first_zoom_examples="add")
    only = trajectory_items(path, first_zoom_examples="only")
    zooming = [it for it in whole if sum(m["role"] == "assistant" for m in it.messages) > 1]
    assert zooming and len(both) == len(whole) + len(zooming)
    cuts = [it for it in both if it not in whole]
    assert [it.messages for it in only] == [it.messages for it in cuts]
    # "every": a cut after each zoom call (a change pair's call on image_1 too), the first ones among them
    every = trajectory_items(path, first_zoom_examples="every")
    n_calls = sum(sum(m["role"] == "assistant" for m in it.messages) - 1 for it in zooming)
    assert len(every) == n_calls > len(only)
    assert all(any(e.messages == o.messages for e in every) for o in only)
    for it in every:
        last = it.messages[-1]
        assert last["role"] == "assistant" and parse_turn(last["content"]).tool_call is not None
        assert len(ChatDataset([it])[0]["images"]) == len(it.image_files)
    second = [it for it in every if [m["role"] for m in it.messages].count("assistant") == 2]
    assert len(second) == 1 and parse_turn(second[0].messages[-1]["content"]).tool_call.arguments["source"] == "image_1"
    assert second[0].messages[-2]["role"] == "tool" and len(second[0].image_files) == 3  # 2 inputs + the 1st view
    for it in cuts:
        last = it.messages[-1]
        assert last["role"] == "assistant" and [m["role"] for m in it.messages].count("assistant") == 1
        assert parse_turn(last["content"]).tool_call is not None  # ends on the aiming turn
        assert "tool" not in [m["role"] for m in it.messages]
        row = ChatDataset([it])[0]  # only the input images, and the token count matches them
        n_placeholders = sum(1 for m in it.messages if isinstance(m["content"], list)
                             for c in m["content"] if c.get("type") == "image")
        assert len(row["images"]) == n_placeholders == len(it.image_files)
        assert it.n_image_tokens == sum(im.size[0] * im.size[1] // 784 for im in row["images"])


def test_stages_sharing_a_trajectory_folder_reuse_it_and_train_on_their_own_samples(scenes, tmp_path):
    """`trajectory_dir`: a later stage reuses the trajectories an earlier one rendered there (not rendered twice)
    and trains only on its own vqa_data's samples, even when the folder holds more."""
    from pipeline.core.records import read_vqa
    from sft.config import SFTConfig
    from sft.data import materialize_trajectories, trajectory_items
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    manifest, vqa = scenes
    samples = read_vqa([vqa])
    shared = SFTConfig(output_dir=str(tmp_path / "b"), trajectory_dir=str(tmp_path / "shared")).trajectory_folder()
    assert shared == tmp_path / "shared" and SFTConfig(output_dir="x").trajectory_folder() == Path("x/sft_data")
    store = ImageStore.from_manifest(manifest)
    path, first = materialize_trajectories(samples, store, ZoomConfig(), shared, progress=False)
    path2, again = materialize_trajectories(samples[:3], store, ZoomConfig(), shared, progress=False)
    assert path2 == path and again["written"] == 0 and again["skipped_existing"] == 3 and first["written"] > 3
    mine = trajectory_items(path, sample_ids={s.id for s in samples[:3]})
    assert [it.messages[1] for it in mine] == [it.messages[1] for it in trajectory_items(path)[:3]]
    assert len(mine) == 3 < len(trajectory_items(path))


def test_mix_and_length_filter(tmp_path):
    from sft.data import ChatItem, mix

    text = [ChatItem([{"role": "user", "content": f"t{i}"}], [], "text") for i in range(10)]
    vqa = [ChatItem([{"role": "user", "content": f"v{i}"}], [], "vqa") for i in range(30)]
    assert len(mix(text, vqa, None, 0)) == 40
    m = mix(text, vqa, 0.25, 0)
    assert sum(i.kind == "text" for i in m) == 10 and len(m) == 40
    m = mix(text, vqa, 0.5, 0)
    assert sum(i.kind == "text" for i in m) == 30  # resampled with repeats
    assert mix(text, vqa, 0.5, 1) == mix(text, vqa, 0.5, 1)


def test_length_filter_and_empty_dataset(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KNOWZOOM_CACHE", str(tmp_path_factory.getbasetemp() / "kz_model_cache"))
    from pipeline.models import load_processor
    from sft.data import ChatDataset, ChatItem, filter_by_length
    from sft.errors import SFTDataError

    proc = load_processor("tiny")
    mp.undo()
    short = ChatItem([{"role": "user", "content": "hi"}], [], "text")
    long = ChatItem([{"role": "user", "content": "word " * 300}], [], "text")
    img = ChatItem([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                   ["x.png"], "vqa", n_image_tokens=64)
    kept, dropped = filter_by_length([short, long, img], proc, max_length=60)
    assert kept == [short] and dropped == 2
    with pytest.raises(SFTDataError, match="empty"):
        ChatDataset([])


def test_sft_config_validation_says_what_to_fix(tmp_path):
    from pipeline.core.config import load_config
    from pipeline.core.errors import ConfigError
    from sft.config import SFTConfig

    with pytest.raises(ConfigError, match="text_data/vqa_data"):
        load_config(SFTConfig, None, {"output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="images_manifest"):
        load_config(SFTConfig, None, {"vqa_data": ["x.jsonl"]})
    with pytest.raises(ConfigError, match="text_mix_ratio"):
        load_config(SFTConfig, None, {"text_data": ["x"], "text_mix_ratio": 1.5})
    with pytest.raises(ConfigError, match="deepspeed"):
        load_config(SFTConfig, None, {"text_data": ["x"], "deepspeed": str(tmp_path / "none.json")})
    cfg = load_config(SFTConfig, None, ["--text_data", "a.jsonl,b.jsonl", "--lora", "--max_steps", "3"])
    assert cfg.text_data == ["a.jsonl", "b.jsonl"] and cfg.lora and cfg.max_steps == 3
    json.dumps(cfg.to_dict())


def test_build_items_with_an_empty_hard_set_trains_on_text_and_reports_it(scenes, tmp_path, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KNOWZOOM_CACHE", str(tmp_path_factory.getbasetemp() / "kz_model_cache"))
    from fixtures.toy import write_text_qa

    from pipeline.core.config import load_config
    from pipeline.core.records import write_jsonl
    from pipeline.models import load_processor
    from sft.config import SFTConfig
    from sft.errors import SFTDataError
    from sft.stage import build_items

    proc = load_processor("tiny")
    mp.undo()
    manifest, _ = scenes
    train, _ = write_text_qa(tmp_path / "qa")
    empty = tmp_path / "hard.jsonl"
    write_jsonl(empty, [])
    cfg = load_config(SFTConfig, None, {"output_dir": str(tmp_path / "o"), "text_data": [str(train)],
                                        "vqa_data": [str(empty)], "images_manifest": str(manifest),
                                        "text_mix_ratio": 0.3, "max_text_samples": 5})
    items, stats = build_items(cfg, proc)
    assert stats["vqa_records"] == 0 and stats["text_items"] == 5 == len(items)
    cfg = load_config(SFTConfig, None, {"output_dir": str(tmp_path / "o2"), "vqa_data": [str(empty)],
                                        "images_manifest": str(manifest)})
    with pytest.raises(SFTDataError, match="no SFT examples"):
        build_items(cfg, proc)
    cfg = load_config(SFTConfig, None, {"output_dir": str(tmp_path / "o3"), "vqa_data": [str(empty)],
                                        "images_manifest": str(tmp_path / "missing.jsonl")})
    with pytest.raises(SFTDataError, match="make-scenes"):
        build_items(cfg, proc)


def test_text_think_off_trains_text_answers_without_the_rationale(tmp_path: Path) -> None:
    """`text_think: false` (the tiny default) drops the graph rationale from text QA targets only."""
    from fixtures.toy import write_text_qa

    from pipeline.core.config import load_config
    from sft.config import SFTConfig
    from tools.protocol import text_target

    train, _ = write_text_qa(tmp_path / "qa")
    cfg = load_config(SFTConfig, None, {"output_dir": str(tmp_path / "o"), "text_data": [str(train)],
                                        "text_think": False})
    assert cfg.think and not cfg.text_think
    from pipeline.core.records import TextQA, from_dict

    qa = from_dict(TextQA, json.loads(train.read_text().splitlines()[0]))
    assert text_target(qa, cfg.think and cfg.text_think).startswith("<answer>")
    assert text_target(qa, cfg.think).startswith("<think>")
    assert load_config(SFTConfig, "configs/tiny/sft_text.yaml", []).text_think is False
