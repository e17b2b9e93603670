"""make-scenes and prepare-images: outputs, the need-to-zoom property, oracle views >= 32 px, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.records import VQASample, read_jsonl
from tests.tools_fixtures import make_raster
from tools.protocol import Episode
from tools.scenes import CLASSES, COLOURS, COUNTS, MakeScenesConfig, run
from tools.store import ImageStore
from tools.zoom import ZoomConfig


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    cfg = MakeScenesConfig(output_dir=str(out), size=4096, n_train_scenes=1, n_test_scenes=1, n_train_pairs=0,
                           n_test_pairs=1, pair_size=4096, grid=4, n_vehicles=300, n_houses=100)
    run(cfg)
    return out


def test_layout_and_records(scenes: Path) -> None:
    for name in ("images.jsonl", "scenes.jsonl", "vqa_train.jsonl", "vqa_test.jsonl", "preview.png", "summary.json"):
        assert (scenes / name).exists(), name
    store = ImageStore.from_manifest(scenes / "images.jsonl")
    assert len(store.ids()) == 4
    info = store.info(store.ids()[0])
    assert info.tiled and info.overviews, "images must be tiled COGs with overviews"
    train = list(read_jsonl(scenes / "vqa_train.jsonl", VQASample))
    test = list(read_jsonl(scenes / "vqa_test.jsonl", VQASample))
    assert train and test
    train_imgs = {i for s in train for i in s.images}
    assert not train_imgs & {i for s in test for i in s.images}, "test scenes must be held out"
    truth = {d["id"]: d for d in map(json.loads, (scenes / "scenes.jsonl").read_text().splitlines())}
    assert truth["scene_train_000"]["sites"] != truth["scene_test_000"]["sites"], "a test scene copies a train scene"
    train_q = {(s.question, s.answer) for s in train}
    assert sum((s.question, s.answer) in train_q for s in test) < len(test) / 2, "test questions repeat train ones"
    cats = {s.category for s in test}
    assert "Object properties/Object color" in cats and "Counting/Counting with changing detection" in cats
    assert all("/" in s.category and s.l2_category for s in test)
    assert all(i in store for s in train + test for i in s.images)
    assert len({s.id for s in train + test}) == len(train) + len(test)


def test_fixed_option_order(scenes: Path) -> None:
    """Options never shuffled: each question type always lists the same options in the same order."""
    test = list(read_jsonl(scenes / "vqa_test.jsonl", VQASample))
    by_task: dict[str, set[tuple[str, ...]]] = {}
    for s in test:
        by_task.setdefault(s.meta["task"], set()).add(tuple(s.choices))
    for task, variants in by_task.items():
        if task in ("class",):
            assert len(variants) <= 2  # singular/plural wording, same order
        else:
            assert len(variants) == 1, task
    colour = next(iter(by_task["colour"]))
    assert [c.split(") ")[1] for c in colour] == list(COLOURS)
    count = next(iter(by_task["count"]))
    assert [int(c.split(") ")[1]) for c in count] == list(COUNTS)
    cls = [s for s in test if s.meta["task"] == "class"][0]
    assert [c.split(") ")[1].rstrip("s") for c in cls.choices] == [c.rstrip("s") for c in CLASSES]


def test_answers_match_the_ground_truth_pixels(scenes: Path) -> None:
    """The colour in the answer is the colour drawn at the object's centre."""
    from tools.scenes import COLOUR_RGB

    store = ImageStore.from_manifest(scenes / "images.jsonl")
    test = [s for s in read_jsonl(scenes / "vqa_test.jsonl", VQASample) if s.meta["task"] == "colour"]
    assert test
    for s in test[:8]:
        colour = COLOURS["ABCD".index(s.answer)]
        x0, y0, x1, y1 = s.meta["objects"][0]
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        with store.open(s.images[0]) as ds:
            from rasterio.windows import Window

            px = ds.read(window=Window(cx - 2, cy - 2, 4, 4)).reshape(3, -1).mean(1)
        ref = np.array(COLOUR_RGB[colour], float)
        dists = {c: np.abs(px - np.array(v)).sum() for c, v in COLOUR_RGB.items()}
        assert min(dists, key=dists.get) == colour, (s.id, px, ref)


def test_questions_need_zoom_and_oracle_view_shows_32px(scenes: Path) -> None:
    """Objects shrink below 2 px in the overview; the oracle zoom (overview frame, rounded) shows them >= 32 px."""
    store = ImageStore.from_manifest(scenes / "images.jsonl")
    samples = [s for s in read_jsonl(scenes / "vqa_test.jsonl", VQASample)
               if s.meta["task"] in ("count", "colour", "class", "relation", "change")]
    assert samples
    for cfg, s in [(ZoomConfig(frame=f), s) for f in ("shown_pixels", "norm1000") for s in samples]:  # 224 views
        ep = Episode(store, s.images, cfg)
        for t in s.targets:
            ov = ep.observations[f"image_{t.image}"]
            sx, sy = ov.scale
            obs = ep.zoom_in(ep.oracle_bbox(t.image, t.bbox), f"image_{t.image}")
            vx, vy = obs.scale
            for x0, y0, x1, y1 in s.meta["objects"]:
                side = max(x1 - x0, y1 - y0)
                assert side / min(sx, sy) < 2.0, (s.id, side, sx)  # below ~2 px in the overview
                assert side / max(vx, vy) >= 32, (s.id, side, vx)  # >= 32 px in the oracle view
                # and the object is inside the oracle view
                assert obs.window[0] <= x0 and obs.window[1] <= y0 and x1 <= obs.window[2] and y1 <= obs.window[3]
    # the default 8192^2 scenes with the default 8x8 grid keep these numbers (sizes scale the same way)
    assert 8192 / 224 * 2 > 44


def test_a_change_pairs_second_zoom_names_image_1_and_copies_the_box_the_tool_just_echoed(scenes: Path) -> None:
    """The oracle episode of a change question zooms the site in image_0, then the same box in image_1. The
    second think names the image, not the site: its box is the one the tool's text just echoed, a fixed few tokens
    back, and the call zooms image_1 with it (docs/tiny_model.md, "The change pair's second call")."""
    import re

    from sft.data import oracle_trajectory
    from tools.protocol import parse_turn

    store = ImageStore.from_manifest(scenes / "images.jsonl")
    pairs = [s for s in read_jsonl(scenes / "vqa_test.jsonl", VQASample) if s.meta["task"] == "change"]
    assert pairs
    for s in pairs:
        msgs, images, _ = oracle_trajectory(s, store, ZoomConfig(frame="norm1000"))
        assert [m["role"] for m in msgs[2:]] == ["assistant", "tool", "assistant", "tool", "assistant"]
        first, second = parse_turn(msgs[2]["content"]).tool_call, parse_turn(msgs[4]["content"]).tool_call
        assert first is not None and second is not None
        box = first.arguments["bbox"]
        assert msgs[2]["content"].startswith(f"<think>Zoom in on {s.meta['zoom_on']}: [")
        echoed = re.search(r"obs_1: zoom of image_0 (\[[0-9, ]+\])", msgs[3]["content"][-1]["text"])
        assert echoed and json.loads(echoed.group(1)) == box
        assert msgs[4]["content"].startswith(f"<think>Zoom in on image_1: {echoed.group(1)}.</think><tool_call>")
        assert second.arguments == {"bbox": box, "source": "image_1"}
        assert len(images) == 4 and images[2].size == images[3].size


def test_grid_10_base_0_norm1000_boxes_copy_the_grid_index(tmp_path: Path) -> None:
    """The tiny default's quantised boxes: site (r, c) of a 10x10 grid on an 8192 scene zooms on [c41, r41, c59,
    r59] in norm1000, and the question names the same 0-based row and column."""
    from types import SimpleNamespace

    import numpy as np

    from tools.scenes import plan_scene, scene_questions, site_box
    from tools.zoom import Observation

    ov = Observation(name="image_0", image=Image.new("RGB", (224, 224)), image_id="s", image_index=0,
                     window=(0.0, 0.0, 8192.0, 8192.0), frame="norm1000", native_size=(8192, 8192))
    ep = SimpleNamespace(observations={"image_0": ov})
    for r, c in [(0, 0), (3, 7), (9, 9)]:
        box = Episode.oracle_bbox(ep, 0, [float(v) for v in site_box(8192, 10, 144, r, c)])  # type: ignore[arg-type]
        assert box == [100 * c + 41, 100 * r + 41, 100 * c + 59, 100 * r + 59]
    scene = plan_scene(np.random.default_rng(0), "s", 8192, 10, 144)
    for site in scene.sites:
        site.setdefault("first_is", "left of")
    q = scene_questions(scene, "s", "test", np.random.default_rng(1), 0.0, base=0)
    s = next(x for x in q if x.meta.get("site") == [3, 7])
    assert "row 3, column 7 of a 10x10 grid" in s.question


def test_tiny_site_phrasing_copies_in_box_order_and_the_think_restates_it(tmp_path: Path) -> None:
    """The tiny default names sites "column c, row r" (the box's digit order), asks only about row/column >= 1
    (3-digit boxes), zooms land use on the site box, and the oracle zoom turn restates the site, then the box."""
    from types import SimpleNamespace

    import numpy as np

    from sft.data import oracle_trajectory
    from tools.scenes import plan_scene, scene_questions

    cfg = load_config(MakeScenesConfig, Path("configs/tiny/make_scenes.yaml"))
    assert (cfg.site_order, cfg.min_site_index, cfg.landuse_box, cfg.site_index_base) == ("column_row", 1, "site", 0)
    scene = plan_scene(np.random.default_rng(0), "s", 8192, 10, 144)
    for site in scene.sites:
        site.setdefault("first_is", "left of")
    q = scene_questions(scene, "s", "test", np.random.default_rng(1), 1.0, base=0, order="column_row",
                        min_index=1, landuse_box="site")
    assert q and all(min(x.meta["site"]) >= 1 for x in q if "site" in x.meta)
    s = next(x for x in q if x.meta.get("site") == [3, 7] and x.meta["task"] != "landuse")
    assert "column 7, row 3 of a 10x10 grid" in s.question and s.meta["zoom_on"] == "column 7, row 3"
    lu = next(x for x in q if x.meta.get("site") == [3, 7] and x.meta["task"] == "landuse")
    assert lu.targets[0].bbox == s.targets[0].bbox and "column 7, row 3" in lu.question
    bad = MakeScenesConfig(site_order="diagonal", min_site_index=99, landuse_box="x")
    msgs = " ".join(bad.validate())
    for f in ("site_order", "min_site_index", "landuse_box"):
        assert f in msgs

    # the oracle trajectory's zoom turn works the box out in its think, then calls the tool with the same box
    ov = SimpleNamespace(image=Image.new("RGB", (224, 224)))

    class _Ep:
        def __init__(self, *a: object) -> None:
            pass

        def initial_observations(self) -> list:
            return [ov]

        def oracle_bbox(self, image: int, bbox: list[float]) -> list[int]:
            return [741, 341, 759, 359]

        def execute(self, call: object) -> SimpleNamespace:
            return SimpleNamespace(error=None, observation=ov)

    import tools.protocol as proto

    orig, proto.Episode = proto.Episode, _Ep  # type: ignore[misc]
    orig_tm, proto.tool_message = proto.tool_message, lambda r: {"role": "tool", "content": "obs"}  # type: ignore
    try:
        msgs_, _, _ = oracle_trajectory(s, None, SimpleNamespace(frame="norm1000", max_turns=3))
    finally:
        proto.Episode, proto.tool_message = orig, orig_tm  # type: ignore[misc]
    zoom_turn = next(m["content"] for m in msgs_ if m["role"] == "assistant")
    assert zoom_turn.startswith("<think>Zoom in on column 7, row 3: [741, 341, 759, 359].</think><tool_call>")
    assert zoom_turn.endswith('"bbox": [741, 341, 759, 359], "source": "image_0"}}</tool_call>')
    # the answer turn first says what the zoom shows, then answers
    assert msgs_[-1]["content"] == f"<think>I see {s.meta['sees']}.</think><answer>{s.answer}</answer>"


def test_what_a_zoom_shows_agrees_with_every_answer_about_its_site(scenes: Path) -> None:
    """meta["sees"] (the oracle's answer think) names the count, colour, class, relation, land cover and change
    that the site's questions ask about: each answer option can be read off it."""
    from tools.scenes import CHANGE_COUNTS, COVERS, RELATIONS, plan_scene, scene_questions

    samples = list(read_jsonl(scenes / "vqa_test.jsonl", VQASample)) + list(
        read_jsonl(scenes / "vqa_train.jsonl", VQASample))
    # land use on the site box (the tiny default's landuse_box) is what the zoom shows; on the grid cell it is not
    scene = plan_scene(np.random.default_rng(0), "s", 8192, 10, 144)
    for site in scene.sites:
        site.setdefault("first_is", "left of")
        site["objects"] = [[0, 0, 1, 1]] * len(site["colours"])
    samples += scene_questions(scene, "s", "test", np.random.default_rng(1), 1.0, landuse_box="site")
    seen = set()
    for s in samples:
        if "site" not in s.meta:
            assert s.meta["task"] == "overall" and "sees" not in s.meta
            continue
        if "sees" not in s.meta:
            assert s.meta["task"] == "landuse" and "grid cell" in s.question
            continue
        sees, task = s.meta["sees"], s.meta["task"]
        option = s.choices["ABCDEFGH".index(s.answer)].split(") ", 1)[1]
        seen.add(task)
        if task == "change":
            assert sees.endswith(f": {option} new") and int(option) in CHANGE_COUNTS, (sees, option)
        elif task == "relation":
            assert f" {option} a " in sees and option in RELATIONS, (sees, option)
        elif task == "landuse":
            assert sees.endswith(f" on {option}") and option in COVERS, (sees, option)
        elif task == "count":
            assert sees.startswith(f"{option} "), (sees, option)
        elif task == "colour":
            assert sees.split()[1] == option, (sees, option)
        elif task == "class":
            assert f" {option} on " in sees or f" {option.rstrip('s')} on " in sees, (sees, option)
        if task in ("count", "colour", "class"):
            assert int(sees.split()[0]) == len(s.meta["objects"]), (sees, s.meta["objects"])
    assert {"change", "count", "colour", "class", "relation", "landuse"} <= seen, seen


def test_default_config_counts_and_validation(tmp_path: Path) -> None:
    cfg = load_config(MakeScenesConfig, Path("configs/tiny/make_scenes.yaml"))
    assert cfg.output_dir == "runs/tiny/scenes" and cfg.size == 8192
    # >= 400 test items: 3 held-out scenes x 64 sites x ~2.25 questions + a change pair
    assert cfg.n_test_scenes * cfg.grid**2 * 2 + cfg.n_test_pairs * cfg.grid**2 >= 400
    bad = MakeScenesConfig(size=100, grid=40, compress="PNG", landuse_fraction=2)
    msgs = " ".join(bad.validate())
    for f in ("size", "grid", "compress", "landuse_fraction"):
        assert f in msgs


def test_rerun_is_deterministic_and_keeps_existing_cogs(scenes: Path, tmp_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (scenes / "images").glob("*.tif")}
    q1 = (scenes / "vqa_test.jsonl").read_text()
    cfg = MakeScenesConfig(output_dir=str(scenes), size=4096, n_train_scenes=1, n_test_scenes=1, n_train_pairs=0,
                           n_test_pairs=1, pair_size=4096, grid=4, n_vehicles=300, n_houses=100, preview=False)
    run(cfg)
    assert (scenes / "vqa_test.jsonl").read_text() == q1
    assert {p.name: p.stat().st_mtime_ns for p in (scenes / "images").glob("*.tif")} == before


def test_prepare_images_png_jpeg_to_cog_idempotent(tmp_path: Path) -> None:
    from tools.prepare import PrepareImagesConfig
    from tools.prepare import run as prepare

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    make_raster(src / "a.png", 1500, 1200, driver="PNG")
    make_raster(src / "sub" / "b.jpg", 1300, 900, driver="JPEG")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = PrepareImagesConfig(input_dir=str(src), output_dir=str(tmp_path / "out"), allow_failures=True)
    s1 = prepare(cfg)
    assert s1["converted"] == 2 and s1["failed"] == 1 and "broken" in s1["errors"][0]
    s2 = prepare(cfg)
    assert s2["converted"] == 0 and s2["skipped"] == 2
    store = ImageStore.from_manifest(tmp_path / "out" / "images.jsonl")
    assert sorted(store.ids()) == ["a", "sub__b"]
    info = store.info("a")
    assert info.tiled and info.overviews and (info.width, info.height) == (1500, 1200)
    # PNG is lossless: a 1:1 crop of the COG shows the source's exact coordinate pixels... JPEG-compressed
    # COG: approximately
    obs = Episode(store, ["a"], ZoomConfig()).zoom_in([0, 0, 20, 20])
    assert np.asarray(obs.image).shape[2] == 3
    cfg_bad = PrepareImagesConfig(input_dir=str(tmp_path / "nope"))
    assert any("input_dir" in p for p in cfg_bad.validate())


def test_preview_is_an_image(scenes: Path) -> None:
    im = Image.open(scenes / "preview.png")
    assert im.width > 400
    assert json.loads((scenes / "summary.json").read_text())["vqa_test"] > 0


def test_knowledge_family_needs_the_text_fact_and_the_probe_set_is_a_fixed_test_subset(scenes: Path) -> None:
    """Operator questions never name the class; text-only classes are never asked in training; kg_facts.jsonl
    states every operator; vqa_probe.jsonl is a per-task subset of the held-out set."""
    from pipeline.core.records import TextQA
    from tools.scenes import CLASSES, OPERATOR_OF, OPERATORS, PLURAL

    train = list(read_jsonl(scenes / "vqa_train.jsonl", VQASample))
    test = list(read_jsonl(scenes / "vqa_test.jsonl", VQASample))
    scenes_truth = {json.loads(line)["id"]: json.loads(line) for line in (scenes / "scenes.jsonl").read_text().splitlines()}
    ops = [s for s in train + test if s.meta["task"].startswith("operator")]
    assert ops and all(s.targets for s in ops)
    for s in ops:
        site = next(x for x in scenes_truth[s.meta["scene"]]["sites"] if [x["row"], x["col"]] == s.meta["site"])
        assert not any(c in s.question for c in ("ship", "plane", "tank", "building"))  # the class is seen, not told
        assert s.choices == [f"({'ABCD'[i]}) {o}" for i, o in enumerate(OPERATORS)]
        assert s.answer == "ABCD"[OPERATORS.index(OPERATOR_OF[site["cls"]])]
        assert (site["cls"] in ("ship", "plane")) == (s.meta["task"] == "operator")
    assert not [s for s in train if s.meta["task"] == "operator_text_only"]
    assert {s.meta["task"] for s in test} & {"operator", "operator_text_only"}  # 16 sites: one kind at least
    facts = list(read_jsonl(scenes / "kg_facts.jsonl", TextQA))
    for cls, op in OPERATOR_OF.items():
        assert any(cls.split()[-1] in f.question and f.answer == "ABCD"[OPERATORS.index(op)] for f in facts)
    held_out = list(read_jsonl(scenes / "kg_facts_test.jsonl", TextQA))
    assert len(held_out) >= 60 and not {f.question for f in held_out} & {f.question for f in facts}  # rephrasings
    tf = [f.answer for f in held_out if f.qtype == "tf"]
    assert tf and tf.count("true") == tf.count("false")  # a constant true/false answer scores chance, no more
    for f in held_out:  # the same facts, asked anew: every answer follows from OPERATOR_OF
        named_op = [o for o in OPERATORS if o in f.question]
        named_cls = [c for c in CLASSES if PLURAL[c] in f.question.lower()]
        if f.qtype == "tf":
            assert (f.answer == "true") == (OPERATOR_OF[named_cls[0]] == named_op[0])
        elif named_cls:
            assert f.answer == "ABCD"[OPERATORS.index(OPERATOR_OF[named_cls[0]])]
        else:
            assert f.answer == "ABCD"[CLASSES.index(next(c for c, o in OPERATOR_OF.items() if o == named_op[0]))]
    probe = list(read_jsonl(scenes / "vqa_probe.jsonl", VQASample))
    ids = {s.id for s in test}
    assert probe and all(s.id in ids for s in probe)
    per_task: dict[str, int] = {}
    for s in probe:
        per_task[s.category] = per_task.get(s.category, 0) + 1
    assert max(per_task.values()) <= 24 and set(per_task) == {s.category for s in test}


def test_site_hint_ends_every_site_question_at_one_offset() -> None:
    """With `site_hint` (the tiny default) every question about a site, single scenes and change pairs, ends its
    user turn with "Site: column c, row r." naming the site the oracle zooms on, so the tokens between that site
    and the answer are the same for every template; without it the prompt is the plain XLRS-style one."""
    from tools.protocol import DEFAULT_INSTRUCTION, build_prompt_messages
    from tools.scenes import pair_questions, plan_scene, scene_questions

    assert load_config(MakeScenesConfig, Path("configs/tiny/make_scenes.yaml")).site_hint
    scene = plan_scene(np.random.default_rng(0), "s", 8192, 10, 144)
    for site in scene.sites:
        site.setdefault("first_is", "left of")
        site.setdefault("new", 1)
    kw = dict(base=0, order="column_row", min_index=1, landuse_box="site")
    qs = scene_questions(scene, "s", "train", np.random.default_rng(1), 1.0, 1.0, ("ship",), site_hint=True, **kw)
    qs += pair_questions(scene, ("a", "b"), "train", 0, "column_row", 1, site_hint=True)
    tails = set()
    for q in qs:
        text = build_prompt_messages(q, "norm1000")[-1]["content"][-1]["text"]
        if "zoom_on" not in q.meta:  # the whole-image question has no site
            assert q.hint == "" and text.endswith(DEFAULT_INSTRUCTION)
            continue
        assert q.hint == f"Site: {q.meta['zoom_on']}." and q.meta["zoom_on"] in q.question
        assert text.endswith(DEFAULT_INSTRUCTION + "\n" + q.hint)
        tails.add(q.meta["task"])
    assert tails >= {"count", "colour", "class", "relation", "operator", "landuse", "change"}
    plain = scene_questions(scene, "s", "train", np.random.default_rng(1), 1.0, **kw)
    assert all(q.hint == "" for q in plain)


def test_a_site_zoom_shows_the_land_cover_its_land_use_question_asks(tmp_path: Path) -> None:
    """With land use asked on the site box, the cover in the answer is the cover visible around the site's pad
    (the pad once covered the whole box, and the answer was not in the view the oracle zoom opens)."""
    from rasterio.windows import Window

    from tools.scenes import COVER_RGB, COVERS, PAD_INSET

    cfg = MakeScenesConfig(output_dir=str(tmp_path), size=4096, n_train_scenes=1, n_test_scenes=0, n_train_pairs=0,
                           n_test_pairs=0, grid=4, landuse_box="site", landuse_fraction=1.0, preview=False,
                           n_vehicles=0, n_houses=0)
    run(cfg)
    store = ImageStore.from_manifest(tmp_path / "images.jsonl")
    lu = [s for s in read_jsonl(tmp_path / "vqa_train.jsonl", VQASample) if s.meta["task"] == "landuse"]
    assert len(lu) >= 8
    agree = 0
    for s in lu:
        x0, y0, x1, y1 = (int(v) for v in s.targets[0].bbox)
        with store.open(s.images[0]) as ds:
            px = ds.read(window=Window(x0, y0, x1 - x0, y1 - y0)).transpose(1, 2, 0).astype(float)
        frame = np.ones(px.shape[:2], bool)
        frame[PAD_INSET:-PAD_INSET, PAD_INSET:-PAD_INSET] = False
        seen = np.median(px[frame], axis=0) - 20  # the scene texture adds 0-40 grey to the palette
        nearest = min(COVERS, key=lambda c: np.abs(seen - np.array(COVER_RGB[c], float)).sum())
        agree += "ABCDEF"[COVERS.index(nearest)] == s.answer
    assert agree >= 0.8 * len(lu), (agree, len(lu))


def test_look_set_views_show_what_their_think_names(tmp_path: Path) -> None:
    """make-scenes' look/ set: one-turn trajectories in the tool turn's format, each view holding objects of the
    colour its think names, and the think in the words of site_description."""
    import re

    from pipeline.core.records import Trajectory
    from tools.scenes import COLOUR_RGB, COVERS, PLURAL, _texture_tile, write_look_set

    n = write_look_set(MakeScenesConfig(look_crops=12), tmp_path, _texture_tile(np.random.default_rng(0)))
    rows = list(read_jsonl(tmp_path / "trajectories.jsonl", Trajectory))
    assert n == len(rows) == 12
    nouns = "|".join(sorted({*PLURAL, *PLURAL.values()}, key=len, reverse=True))
    pat = re.compile(rf"<think>I see ([1-5]) (white|red|blue|yellow) ({nouns}) on ({'|'.join(COVERS)})\.</think>")
    for t in rows:
        tool, think = t.messages
        assert tool["role"] == "tool" and tool["content"][0] == {"type": "image"}
        assert re.fullmatch(r"obs_1: zoom of image_0 \[[1-9]41, [1-9]41, [1-9]59, [1-9]59\], shown at 224x224\.",
                            tool["content"][1]["text"])
        m = pat.fullmatch(think["content"])
        assert m, think["content"]
        px = np.asarray(Image.open(tmp_path / t.observations[0]["file"]), float)
        assert px.shape == (224, 224, 3)
        near = (np.abs(px - np.array(COLOUR_RGB[m.group(2)], float)).sum(-1) < 40).mean()
        assert near > 0.005, (think["content"], near)  # the named colour covers part of the view


def test_swap_views_answer_their_question_and_replace_the_crop_in_its_episode(tmp_path: Path) -> None:
    """make-scenes --swap_views: each view draws the asked attribute anew and keeps the site's class and count
    otherwise, its answer is the letter of what it shows, and the named colour is in its pixels; sft's
    view_swap_items trains the sample's own oracle episode with the view in place of the crop and the view's
    answer (the prompt and aiming turn unchanged)."""
    import re

    from pipeline.core.records import Trajectory
    from sft.data import ChatDataset, materialize_trajectories, trajectory_items, view_swap_items
    from sft.errors import TrajectoryError
    from tools.scenes import CLASSES, COLOUR_RGB, COLOURS, COUNTS, COVERS, PLURAL

    cfg = MakeScenesConfig(output_dir=str(tmp_path / "s"), size=4096, n_train_scenes=1, n_test_scenes=0,
                           n_train_pairs=0, n_test_pairs=0, grid=4, landuse_box="site", landuse_fraction=1.0,
                           preview=False, n_vehicles=0, n_houses=0, swap_views=2, site_hint=True)
    summary = run(cfg)
    train = {s.id: s for s in read_jsonl(tmp_path / "s" / "vqa_train.jsonl", VQASample)}
    rows = list(read_jsonl(tmp_path / "s" / "swap" / "views.jsonl"))
    eligible = [s for s in train.values() if s.meta["task"] in ("count", "colour", "class", "landuse")
                and s.meta["sees"][0].isdigit()]  # not a pair site's land cover ("a red ship above a ...")
    assert summary["swap_views"] == len(rows) == 2 * len(eligible) > 0
    assert {r["task"] for r in rows} == {"count", "colour", "class", "landuse"}
    nouns = "|".join(sorted({*PLURAL, *PLURAL.values()}, key=len, reverse=True))
    pat = re.compile(rf"([1-5]) (white|red|blue|yellow) ({nouns}) on ({'|'.join(COVERS)})")
    options = {"count": [str(c) for c in COUNTS], "colour": list(COLOURS), "class": list(CLASSES),
               "landuse": list(COVERS)}
    for r in rows:
        k, colour, noun, cover = pat.fullmatch(r["sees"]).groups()
        cls = next(c for c in CLASSES if noun in (c, PLURAL[c]))
        value = {"count": k, "colour": colour, "class": cls, "landuse": cover}[r["task"]]
        assert options[r["task"]]["ABCDEF".index(r["answer"])] == value
        site = train[r["sample_id"]].meta["sees"]
        site_k, site_cls = site.split()[0], next(c for c in CLASSES if f" {PLURAL[c]} " in site or f" {c} " in site)
        if r["task"] != "count":
            assert k == site_k, (r, site)
        if r["task"] != "class":
            assert cls == site_cls, (r, site)
        px = np.asarray(Image.open(tmp_path / "s" / "swap" / r["file"]), float)
        assert px.shape == (224, 224, 3)
        assert (np.abs(px - np.array(COLOUR_RGB[colour], float)).sum(-1) < 40).mean() > 0.003, r

    store = ImageStore.from_manifest(tmp_path / "s" / "images.jsonl")
    some = eligible[:3]
    path, _ = materialize_trajectories(some, store, ZoomConfig(frame="norm1000", max_pixels=50176, min_pixels=3136),
                                       tmp_path / "t", progress=False)
    items, skipped = view_swap_items(tmp_path / "s" / "swap" / "views.jsonl", path)
    assert len(items) == 6 and skipped == len(rows) - 6
    oracle = {t.sample_id: t for t in read_jsonl(path, Trajectory)}
    plain = trajectory_items(path)
    for it, r in zip(items, [r for r in rows if r["sample_id"] in oracle], strict=True):
        t = oracle[r["sample_id"]]
        assert it.messages[:-1] == t.messages[:-1]  # prompt, aiming turn and tool text as in the oracle episode
        assert it.messages[-1] == {"role": "assistant",
                                   "content": f"<think>I see {r['sees']}.</think><answer>{r['answer']}</answer>"}
        assert it.image_files[-1] == str((tmp_path / "s" / "swap" / r["file"]).resolve())
        assert it.image_files[0] == next(p for p in plain if p.messages == t.messages).image_files[0]
        assert it.image_sizes == [tuple(o["shown_size"]) for o in t.observations]
        assert [im.size for im in ChatDataset([it])[0]["images"]] == it.image_sizes  # the view at the crop's size
    only = view_swap_items(tmp_path / "s" / "swap" / "views.jsonl", path, sample_ids={some[0].id})[0]
    assert len(only) == 2
    small = tmp_path / "small"
    (small / "images").mkdir(parents=True)
    Image.new("RGB", (224, 112)).save(small / "images" / "v.png")
    (small / "views.jsonl").write_text(json.dumps({"sample_id": some[0].id, "file": "images/v.png", "sees": "x",
                                                   "answer": "A"}) + "\n")
    with pytest.raises(TrajectoryError, match="224x112"):
        view_swap_items(small / "views.jsonl", path)


def test_think_asks_ends_the_oracle_answer_think_with_the_asked_part(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """make-scenes --think_asks: each site question states the asked part in its right option's words, the
    oracle's answer think ends with it, eval's read % still finds the view's words, and a swapped view's row
    states its own answer's part."""
    from sft.data import oracle_trajectory, view_swap_items
    from tools.protocol import reads_view

    cfg = MakeScenesConfig(output_dir=str(tmp_path / "s"), size=4096, n_train_scenes=1, n_test_scenes=0,
                           n_train_pairs=1, n_test_pairs=0, pair_size=4096, grid=4, landuse_box="site",
                           landuse_fraction=1.0, preview=False, n_vehicles=0, n_houses=0, think_asks=True,
                           swap_views=1, site_hint=True)
    run(cfg)
    train = list(read_jsonl(tmp_path / "s" / "vqa_train.jsonl", VQASample))
    labels = {"count": "Count", "colour": "Colour", "class": "Class", "landuse": "Cover", "relation": "Relation",
              "operator": "Operator", "change": "New"}
    asked = [s for s in train if "asks" in s.meta]
    assert {s.meta["task"] for s in asked} == set(labels)
    assert all(s.meta["task"] == "overall" for s in train if "asks" not in s.meta)
    for s in asked:
        label, value = s.meta["asks"].split(": ", 1)
        assert label == labels[s.meta["task"]]
        assert f"({s.answer}) {value}" in s.choices
    store = ImageStore.from_manifest(tmp_path / "s" / "images.jsonl")
    colour = next(s for s in asked if s.meta["task"] == "colour")
    msgs, _, _ = oracle_trajectory(colour, store, ZoomConfig(frame="norm1000", max_pixels=50176, min_pixels=3136))
    final = msgs[-1]["content"]
    assert final == (f"<think>I see {colour.meta['sees']}. {colour.meta['asks']}.</think>"
                     f"<answer>{colour.answer}</answer>")
    assert reads_view(final, colour.meta["sees"]) and not reads_view(final, "2 blue planes on water")
    rows = list(read_jsonl(tmp_path / "s" / "swap" / "views.jsonl"))
    by_id = {s.id: s for s in train}
    for r in rows:
        choices = by_id[r["sample_id"]].choices
        assert r["asks"].split(": ", 1)[1] == choices["ABCDEF".index(r["answer"])].split(") ", 1)[1]
    from sft.data import materialize_trajectories

    path, _ = materialize_trajectories([colour], store, ZoomConfig(frame="norm1000", max_pixels=50176,
                                                                   min_pixels=3136), tmp_path / "t", progress=False)
    (item,), _ = view_swap_items(tmp_path / "s" / "swap" / "views.jsonl", path)
    r = next(r for r in rows if r["sample_id"] == colour.id)
    assert item.messages[-1]["content"] == f"<think>I see {r['sees']}. {r['asks']}.</think><answer>{r['answer']}</answer>"

    # the SFT stage's data build: every row of a training sample becomes an example beside its oracle episode
    from pipeline.models import load_processor
    from sft.config import SFTConfig
    from sft.stage import build_items

    sft = SFTConfig(output_dir=str(tmp_path / "sft"), vqa_data=[str(tmp_path / "s" / "vqa_train.jsonl")],
                    images_manifest=str(tmp_path / "s" / "images.jsonl"), zoom_frame="norm1000",
                    zoom_max_pixels=50176, view_swap_data=[str(tmp_path / "s" / "swap" / "views.jsonl")])
    assert not sft.validate()
    monkeypatch.setenv("KNOWZOOM_CACHE", str(tmp_path_factory.getbasetemp() / "kz_model_cache"))
    items, stats = build_items(sft, load_processor("tiny"))
    assert stats["view_swap_items"] == len(rows) and stats["view_swap_skipped"] == 0
    assert len(items) == stats["trajectories_written"] + len(rows)


def test_the_cog_is_the_same_whatever_the_staging_layout_and_a_failed_write_fails_the_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rasterio

    from tools import scenes as sc

    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 40, (1536, 1280, 3)) + np.linspace(0, 200, 1280)[None, :, None]).astype("uint8")
    sc.write_cog(arr, tmp_path / "striped.tif", stage_tiled=False)
    sc.write_cog(arr, tmp_path / "tiled.tif")
    assert (tmp_path / "striped.tif").read_bytes() == (tmp_path / "tiled.tif").read_bytes()
    with rasterio.open(tmp_path / "tiled.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.block_shapes[0] == (512, 512) and ds.overviews(1)

    # the writer thread's error reaches the stage, which fails; no half-written COG is left under its name
    calls: list[Path] = []
    real_write = sc.write_cog

    def fail_second(a: np.ndarray, path: Path, *args: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(a, path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sc, "write_cog", fail_second)
    cfg = MakeScenesConfig(output_dir=str(tmp_path / "s"), size=4096, n_train_scenes=2, n_test_scenes=1,
                           n_train_pairs=0, n_test_pairs=0, grid=4, n_vehicles=30, n_houses=10, preview=False)
    with pytest.raises(OSError, match="disk full"):
        run(cfg)
    assert len(calls) == 2, "the stage went on after a failed write"
    assert [p.name for p in (tmp_path / "s" / "images").iterdir()] == ["scene_train_000.tif"]
    assert not (tmp_path / "s" / "vqa_train.jsonl").exists()
