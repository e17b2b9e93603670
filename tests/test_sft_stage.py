"""The SFT stage on CPU with the tiny model: one step of every shipped config (the 7B one with tiny
overrides), freezing and LoRA, outputs (model folder, loss curve, metrics), and kill-and-resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.getbasetemp() / "kz_model_cache"
    mp.setenv("KNOWZOOM_CACHE", str(cache))
    torch.set_num_threads(1)
    from fixtures.scenes import make_scenes
    from fixtures.toy import write_text_qa

    data = tmp_path_factory.mktemp("sftdata")
    train, test = write_text_qa(data / "qa")
    scenes = make_scenes(data / "scenes", n=4, size=1024, square=48, direct_every=4)
    manifest, vqa = scenes.manifest, scenes.vqa
    yield {"train": str(train), "test": str(test), "manifest": str(manifest), "vqa": str(vqa), "cache": cache}
    mp.undo()


def _data_overrides(env, out):
    return {"output_dir": str(out), "text_data": [env["train"]], "vqa_data": [env["vqa"]],
            "images_manifest": env["manifest"], "eval_text_data": [], "max_steps": 1, "logging_steps": 1,
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_text_samples": 8,
            "torch_threads": 1, "save_steps": 1, "dataloader_num_workers": 0}


@pytest.mark.parametrize("config", ["configs/tiny/sft_look.yaml", "configs/tiny/sft_text.yaml", "configs/tiny/sft_aim.yaml",
                                    "configs/tiny/sft_prewarm.yaml", "configs/qwen2_5_vl_7b/sft.yaml"])
def test_one_step_of_every_config(config, env, tmp_path):
    from pipeline.core.config import load_config
    from pipeline.models import load_model
    from pipeline.stages import run_stage
    from sft.config import SFTConfig

    over = _data_overrides(env, tmp_path / "run")
    over["model"] = "tiny"  # the pre-warm config starts from runs/tiny/sft_text/model
    if "sft_text" in config:
        over.pop("vqa_data"), over.pop("images_manifest")
        over.update(eval_text_data=[env["test"]], eval_max_samples=4, eval_max_new_tokens=8, eval_train_samples=3,
                    eval_rephrased_data=[env["test"]])
    if "sft_look" in config:  # make-scenes' look/ views, trained as they are
        import numpy as np

        from tools.scenes import MakeScenesConfig, _texture_tile, write_look_set

        look = tmp_path / "look"
        write_look_set(MakeScenesConfig(look_crops=4), look, _texture_tile(np.random.default_rng(0)))
        for k in ("text_data", "vqa_data", "images_manifest"):
            over.pop(k)
        over["trajectory_data"] = [str(look / "trajectories.jsonl")]
    if "qwen2_5_vl_7b" in config:  # the paper's recipe with a tiny-model override (no GPU, no DeepSpeed; its bf16 stays on)
        over.update(model="tiny", deepspeed="", zoom_max_pixels=50176, max_length=4096, warmup_ratio=0.0,
                    warmup_steps=0, num_processes=1)  # warmup would make the single step's lr 0
    cfg = load_config(SFTConfig, ROOT / config, over)
    if "qwen2_5_vl_7b" in config:
        assert cfg.freeze_vision and cfg.freeze_projector and cfg.gradient_checkpointing
    summary = run_stage("sft", cfg)
    assert summary["global_step"] == 1
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_history"] and (out / "loss_curve.png").stat().st_size > 1000
    if "sft_text" in config:
        assert "eval_before" in metrics and "eval_after" in metrics and metrics["eval_after"]["n"] == 4
        assert metrics["eval_train_after"]["n"] == 3
        assert metrics["eval_rephrased_before"]["n"] == metrics["eval_rephrased_after"]["n"] >= 4
        after = metrics["eval_after"]
        assert sum(v["n"] for v in after["by_qtype"].values()) == 4 and 0.0 <= after["chance"] <= 0.5
        assert 0.0 <= after["prior"] <= 1.0 and "prior" in metrics["eval_before"]
    elif "sft_look" in config:
        assert metrics["data"]["trajectory_data_items"] == metrics["data"]["vqa_items"] == 4
    else:
        assert metrics["data"]["vqa_items"] >= 3 and metrics["data"]["trajectories_failed"] == 0
    model, processor = load_model(str(out))  # loadable by the next stage
    assert model.config.model_type == "qwen2_5_vl"
    if "qwen2_5_vl_7b" in config:  # trained and saved in bf16; frozen tower and projector did not move
        assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
        base, _ = load_model("tiny")  # fp32; the run loaded it in bf16 (the recipe's bf16 on CPU), so compare in bf16
        sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        sb = {k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}
        visual = [k for k in sd if ".visual." in k]
        assert visual and all(torch.equal(sd[k], sb[k]) for k in visual)
        assert any(not torch.equal(sd[k], sb[k]) for k in sd if "language_model" in k)


def test_freeze_and_lora_options(env, tmp_path):
    from pipeline.core.config import load_config
    from pipeline.models import load_model
    from sft.config import SFTConfig
    from sft.stage import prepare_model, run

    model, _ = load_model("tiny")
    cfg = load_config(SFTConfig, None, {"text_data": [env["train"]], "freeze_vision": True})
    prep = prepare_model(model, cfg)
    visual = prep["model"].model.visual
    assert not any(p.requires_grad for n, p in visual.named_parameters() if not n.startswith("merger"))
    assert all(p.requires_grad for p in visual.merger.parameters())

    over = _data_overrides(env, tmp_path / "lora")
    over.update(lora=True, lora_r=4, lora_alpha=8, max_steps=2, learning_rate=1e-2)
    over.pop("vqa_data"), over.pop("images_manifest")
    cfg = load_config(SFTConfig, None, over)
    summary = run(cfg)
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] < 0.2 * metrics["parameters"]["total"]
    merged, _ = load_model(summary["model"])  # adapters merged: a plain model folder
    assert not any("lora" in k for k in merged.state_dict())
    base, _ = load_model("tiny")
    sm, sb = merged.state_dict(), base.state_dict()
    assert any(not torch.equal(sm[k], sb[k]) for k in sm if "q_proj" in k and "visual" not in k)
    assert all(torch.equal(sm[k], sb[k]) for k in sm if ".visual." in k)


def test_freeze_modules_keeps_where_attention_looks_and_trains_the_rest(env, tmp_path):
    """`freeze_modules: [q_proj, k_proj]` (the tiny text cold start): after training, every language layer's
    query and key projections (weights and biases) are the base model's, and the value/output projections and
    MLPs have moved; unknown names and the LoRA combination are refused with a clear message."""
    from pipeline.core.config import load_config
    from pipeline.models import load_model
    from sft.config import SFTConfig
    from sft.stage import run

    over = _data_overrides(env, tmp_path / "qk")
    over.pop("vqa_data"), over.pop("images_manifest")
    over.update(freeze_modules=["q_proj", "k_proj"], max_steps=2, learning_rate=1e-2, warmup_steps=0)
    summary = run(load_config(SFTConfig, None, over))
    trained, _ = load_model(summary["model"])
    base, _ = load_model("tiny")
    st, sb = trained.state_dict(), base.state_dict()
    lm = [k for k in st if "language_model" in k]
    frozen = [k for k in lm if ".q_proj." in k or ".k_proj." in k]
    assert len(frozen) == 4 * base.config.text_config.num_hidden_layers  # weight + bias, q and k, every layer
    assert all(torch.equal(st[k], sb[k]) for k in frozen)
    for name in ("v_proj", "o_proj", "up_proj", "down_proj"):
        assert any(not torch.equal(st[k], sb[k]) for k in lm if f".{name}." in k), name
    assert any("freeze_modules: ['qkv']" in p for p in SFTConfig(text_data=["x"], freeze_modules=["qkv"]).validate())
    assert any(p.startswith("freeze_modules: with lora")
               for p in SFTConfig(text_data=["x"], freeze_modules=["q_proj"], lora=True).validate())


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, json
    import torch
    from transformers import TrainerCallback
    from pipeline.core.config import load_config
    from sft.config import SFTConfig
    from sft.stage import run
    torch.set_num_threads(1)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    run(load_config(SFTConfig, None, json.loads(sys.argv[1])), callbacks=[Kill()])
""")


def test_kill_and_resume_matches_uninterrupted_run(env, tmp_path):
    from pipeline.core.config import load_config
    from sft.config import SFTConfig
    from sft.stage import run

    def over(out):
        o = _data_overrides(env, out)
        o.update(max_steps=6, save_steps=3, per_device_train_batch_size=4, max_text_samples=40, warmup_steps=2,
                 max_vqa_samples=4, text_mix_ratio=0.5)
        return o

    full = run(load_config(SFTConfig, None, over(tmp_path / "full")))
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(over(killed)), "5"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (killed / "checkpoints" / "checkpoint-3").exists() and not (killed / "model").exists()
    resumed = run(load_config(SFTConfig, None, over(killed)))
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    m_res = json.loads((killed / "metrics.json").read_text())
    assert m_res["resumed_from"].endswith("checkpoint-3")
    assert resumed["global_step"] == full["global_step"] == 6
    assert [h["step"] for h in m_res["loss_history"]] == [h["step"] for h in m_full["loss_history"]]
    for a, b in zip(m_res["loss_history"], m_full["loss_history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full" / "model" / "model.safetensors")
    wb = load_file(killed / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_guess_rate_is_the_chance_of_a_uniform_guess():
    from pipeline.core.records import TextQA
    from sft.stage import guess_rate

    def qa(qtype, choices=()):
        return TextQA(id="q", question="?", qtype=qtype, answer="A", choices=list(choices))

    assert guess_rate(qa("mcq", ["(A) x", "(B) y", "(C) z", "(D) w"])) == 0.25
    assert guess_rate(qa("mcq", ["(A) x", "(B) y"])) == 0.5
    assert guess_rate(qa("tf")) == 0.5
    assert guess_rate(qa("fill")) == guess_rate(qa("free")) == 0.0


def test_text_qtypes_keeps_only_those_question_types(tmp_path):
    from pipeline.core.records import TextQA, write_jsonl
    from sft.config import SFTConfig
    from sft.data import read_text_qa

    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [TextQA(id=f"q{i}", question="?", qtype=t, answer="true" if t == "tf" else "A",
                              choices=["(A) x", "(B) y"] if t == "mcq" else [])
                       for i, t in enumerate(["mcq", "tf", "fill", "free", "mcq"])])
    assert [q.id for q in read_text_qa([path], qtypes=["mcq", "tf"])] == ["q0", "q1", "q4"]
    assert [q.id for q in read_text_qa([path], qtypes=["mcq"], limit=1)] == ["q0"]
    assert len(read_text_qa([path])) == 5
    problems = SFTConfig(text_data=[str(path)], text_qtypes=["mcq", "essay"]).validate()
    assert any("text_qtypes" in p and "essay" in p for p in problems)


def test_prior_rate_is_the_template_majority_answer():
    """The held-out set's answer prior: each template's most common training answer (else the question
    type's), scored by the verifier, on entities no training item mentions."""
    from pipeline.core.records import TextQA
    from sft.stage import prior_rate

    def qa(i, qtype, answer, template="", choices=()):
        return TextQA(id=f"q{i}", question=f"question {i}?", qtype=qtype, answer=answer, choices=list(choices),
                      meta={"template": template} if template else {})

    abc = ["(A) a", "(B) b", "(C) c"]
    train = [qa(1, "free", "moving", "motion"), qa(2, "free", "moving", "motion"), qa(3, "free", "stationary", "motion"),
             qa(4, "free", "0", "count"), qa(5, "mcq", "B", "kind", abc), qa(6, "mcq", "B", "kind", abc),
             qa(7, "mcq", "C", "other", abc)]
    held = [qa(10, "free", "moving", "motion"),  # the template's majority: right
            qa(11, "free", "stationary", "motion"),  # wrong
            qa(12, "free", "0", "never-seen"),  # an unseen template falls back to the type's majority, "moving"
            qa(13, "mcq", "B", "kind", abc),  # right
            qa(14, "tf", "true", "truth")]  # no training item of this type: never right
    assert prior_rate(train, held) == 2 / 5
    assert prior_rate(train, []) == 0.0


def test_the_loss_scores_only_labelled_positions_and_equals_trls_all_position_loss(env, tmp_path):
    """On CPU TRL's fused LM head projects every position (prompt, images, padding); KZSFTTrainer projects the
    labelled ones, as TRL does on CUDA. The loss and every gradient must be the same."""
    import trl
    from fixtures.sft_trainer import oracle_items, trainer_and_batch
    from trl.trainer import utils as trl_utils

    from pipeline.models import load_model

    model, processor = load_model("tiny", device="cpu")
    items = oracle_items(env["vqa"], env["manifest"], 3)
    trainer, batch = trainer_and_batch(model, processor, items, tmp_path)
    rows: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        rows.append(int(hidden.shape[0]))
        return apply(hidden, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    results = []
    try:
        for compute in (trainer.compute_loss, lambda m, b: trl.SFTTrainer.compute_loss(trainer, m, b)):
            model.zero_grad()
            loss = compute(model, {k: v.clone() if hasattr(v, "clone") else v for k, v in batch.items()})
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    finally:
        mp.undo()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [labelled, batch["labels"][:, 1:].numel()]
    assert labelled < rows[1] / 3  # most of a zoom episode is prompt and image tokens
    (ours, g_ours), (trls, g_trl) = results
    assert torch.allclose(ours, trls, rtol=1e-5, atol=1e-6)
    assert g_ours.keys() == g_trl.keys() and len(g_ours) > 10
    for n in g_ours:
        assert torch.allclose(g_ours[n], g_trl[n], rtol=1e-4, atol=1e-6), n
    assert trl_utils._use_triton(torch.device("cpu")) is False  # the patch ends with the loss


def test_the_length_sampler_reads_no_images(env, tmp_path, monkeypatch):
    """group_by_length reads the dataset's length column; through the dataset's transform that loaded every
    example's images before the first step (21 s for the pre-warm's 4,867 episodes)."""
    from pipeline.core.config import load_config
    from sft.config import SFTConfig
    from sft.data import ChatDataset
    from sft.stage import run

    loads = {"n": 0}
    getitem = ChatDataset.__getitem__

    def counting(self, i):
        loads["n"] += 1
        return getitem(self, i)

    monkeypatch.setattr(ChatDataset, "__getitem__", counting)
    over = _data_overrides(env, tmp_path / "run")
    over.update(model="tiny", max_steps=2, max_text_samples=40, group_by_length=True, save_steps=100)
    run(load_config(SFTConfig, "configs/tiny/sft_prewarm.yaml", over))
    assert 0 < loads["n"] <= 2 * 2 + 2  # the two steps' batches (+ a look-ahead), not the whole dataset
