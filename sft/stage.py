"""`knowzoom sft`: supervised fine-tuning on TRL's SFTTrainer — text cold start, image pre-warm, or both.

Sources: TextQA JSONL (cold start) and/or VQASample JSONL + its images.jsonl store (pre-warm, turned into
oracle zoom trajectories with crops from the real tool). Both in one run (the paper's mixed SFT; optional
`text_mix_ratio` resamples text to a share of the mix, which keeps text facts from being forgotten during
image SFT) or staged as two runs, the second starting from the first's `<output_dir>/model`.
Loss on assistant tokens only, with masks computed by `sft.masks` (see its docstring for why not TRL's
`assistant_only_loss`). Checkpoints every `save_steps`; a rerun resumes from the last one (optimizer, LR
schedule, RNG and data position restored by the HF Trainer). Outputs: `<output_dir>/model`,
`loss_curve.png`, `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from pipeline.core.records import TextQA
from sft.config import SFTConfig
from sft.errors import SFTDataError

log = logging.getLogger(__name__)




def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------- data build
def build_items(cfg: SFTConfig, processor: Any, *, materialize: bool = True) -> tuple[list[Any], dict[str, Any]]:
    """Text items + materialized trajectories, mixed and length-filtered; returns (items, stats).

    materialize=False reads the trajectories rank 0 wrote (`sft_data/trajectories.jsonl`) without writing:
    the other ranks of a multi-process run call it after a barrier."""
    from pipeline.core.records import read_vqa
    from sft.data import (
        filter_by_length,
        materialize_trajectories,
        mix,
        read_text_qa,
        text_items,
        trajectory_items,
        view_swap_items,
    )

    stats: dict[str, Any] = {}
    texts: list[Any] = []
    vqas: list[Any] = []
    if cfg.text_data:
        records = read_text_qa(cfg.text_data, split=cfg.text_split or None, limit=cfg.max_text_samples,
                               qtypes=cfg.text_qtypes)
        texts = text_items(records, think=cfg.think and cfg.text_think)
        stats["text_records"] = len(records)
    if cfg.vqa_data:
        from tools.store import ImageStore
        from tools.zoom import ZoomConfig

        manifest = Path(cfg.images_manifest)
        if not manifest.exists():
            raise SFTDataError(f"images_manifest {manifest} does not exist; run make-scenes or fix the path")
        store = ImageStore.from_manifest(manifest, roots=cfg.image_roots or None)
        zoom_cfg = ZoomConfig(**cfg.zoom_tool_kwargs())
        samples = read_vqa(cfg.vqa_data, limit=cfg.max_vqa_samples)
        if materialize:
            path, tstats = materialize_trajectories(samples, store, zoom_cfg, cfg.trajectory_folder(),
                                                    think=cfg.think, max_zooms=cfg.max_zooms)
        else:
            path, tstats = cfg.trajectory_folder() / "trajectories.jsonl", {}
            if not path.exists():
                raise SFTDataError(f"{path} missing after rank 0 built it (is output_dir on a shared disk?)")
        vqas = trajectory_items(path, first_zoom_examples=cfg.first_zoom_examples,
                                sample_ids={s.id for s in samples})
        for f in cfg.view_swap_data:
            swapped, skipped = view_swap_items(f, path, sample_ids={s.id for s in samples})
            vqas += swapped
            stats["view_swap_items"] = stats.get("view_swap_items", 0) + len(swapped)
            stats["view_swap_skipped"] = stats.get("view_swap_skipped", 0) + skipped
        stats.update({"vqa_records": len(samples), **{f"trajectories_{k}": v for k, v in tstats.items()}})
    if cfg.trajectory_data:
        ready = [it for f in cfg.trajectory_data for it in trajectory_items(f)]
        stats["trajectory_data_items"] = len(ready)
        vqas += ready
    items = mix(texts, vqas, cfg.text_mix_ratio, cfg.seed)
    items, dropped = filter_by_length(items, processor, cfg.max_length)
    stats.update(items=len(items), text_items=sum(i.kind == "text" for i in items),
                 vqa_items=sum(i.kind == "vqa" for i in items), dropped_too_long=dropped)
    if not items:
        raise SFTDataError("no SFT examples left (empty inputs, or all longer than max_length)")
    return items, stats


# --------------------------------------------------------------------------------------------- model prep
def prepare_model(model: Any, cfg: SFTConfig) -> dict[str, Any]:
    """Apply freezing and LoRA; returns trainable/total parameter counts and the (possibly wrapped) model."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is not None:
        merger = getattr(visual, "merger", None)
        merger_ids = {id(p) for p in merger.parameters()} if merger is not None else set()
        for p in visual.parameters():
            is_proj = id(p) in merger_ids
            if (is_proj and cfg.freeze_projector) or (not is_proj and cfg.freeze_vision):
                p.requires_grad_(False)
    if cfg.freeze_modules:
        frozen = tuple(f".{m}." for m in cfg.freeze_modules)
        visual_ids = {id(p) for p in visual.parameters()} if visual is not None else set()
        for name, p in model.named_parameters():
            if id(p) not in visual_ids and any(f in name for f in frozen):
                p.requires_grad_(False)  # weight and bias of the named projections, in every language layer
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        pattern = rf"^(?!.*visual).*\.({'|'.join(cfg.lora_target_modules)})$"
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=pattern,
                                                 task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "model": model}


# ------------------------------------------------------------------------------------------- text eval
def evaluate_text_qa(model: Any, processor: Any, records: list[TextQA], *, max_new_tokens: int = 128,
                     batch_size: int = 32) -> dict[str, Any]:
    """Greedy answers to held-out TextQA, scored by the strict verifier (rl.verifier.verify_sample), with the
    accuracy per question type and `chance`, the expected accuracy of a uniform guess among the options (1/k for a
    k-option mcq, 1/2 for true/false, 0 for fill and free answers)."""
    import torch

    from rl.verifier import verify_sample
    from tools.protocol import text_prompt_messages

    if torch.cuda.is_available() and model.device.type == "cpu":  # scoring before the Trainer placed it
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    correct = parse_fail = 0
    examples: list[dict[str, Any]] = []
    by_qtype: dict[str, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            prompts = [processor.apply_chat_template(text_prompt_messages(q), tokenize=False,
                                                     add_generation_prompt=True) for q in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            for q, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=False):
                text = tok.decode(seq, skip_special_tokens=False).split("<|im_end|>")[0]
                r = verify_sample(text, q)
                correct += r.correct
                parse_fail += r.parse_failure
                by_qtype.setdefault(q.qtype, [0, 0])[0] += int(r.correct)
                by_qtype[q.qtype][1] += 1
                if len(examples) < 5:
                    examples.append({"id": q.id, "answer": q.answer, "output": text[:300], "correct": r.correct})
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    n = len(records)
    return {"n": n, "accuracy": correct / n if n else 0.0, "parse_failures": parse_fail,
            "chance": sum(map(guess_rate, records)) / n if n else 0.0,
            "by_qtype": {k: {"n": t, "accuracy": c / t} for k, (c, t) in sorted(by_qtype.items())},
            "examples": examples}


def prior_rate(train: list[TextQA], records: list[TextQA]) -> float:
    """Accuracy of a model that learned no fact, only each question template's most common training answer
    (the template in `meta["template"]`, else the question type), scored by the same verifier. Build-qa's
    held-out split asks about entities no training item mentions, so what the text stage can show there is this
    prior at best; `chance` (a uniform guess, 0 for free answers) reads below it."""
    from collections import Counter

    from rl.verifier import verify_sample

    counts: dict[tuple[str, str], Counter[str]] = {}  # ("", qtype): for a template no training item has
    for q in train:
        for key in ((str(q.meta.get("template") or ""), q.qtype), ("", q.qtype)):
            counts.setdefault(key, Counter())[str(q.answer).strip()] += 1
    hits = 0
    for q in records:
        c = counts.get((str(q.meta.get("template") or ""), q.qtype)) or counts.get(("", q.qtype))
        if c:
            hits += int(verify_sample(f"<answer>{c.most_common(1)[0][0]}</answer>", q).correct)
    return hits / len(records) if records else 0.0


def guess_rate(q: TextQA) -> float:
    """Expected accuracy of a uniform guess on one question (mcq 1/k, tf 1/2, fill and free 0)."""
    if q.qtype == "mcq" and q.choices:
        return 1.0 / len(q.choices)
    return 0.5 if q.qtype == "tf" else 0.0


# ------------------------------------------------------------------------------------------------ plots
def plot_loss(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- run
def _trainer_class() -> type:
    """SFTTrainer whose resume really restores the weights.

    `Trainer._load_from_checkpoint` misses every key of a Qwen2.5-VL checkpoint (transformers 5.17); the shared
    `pipeline.models.load_checkpoint_weights` loads it through `from_pretrained` and fails loudly on a mismatch."""
    import trl

    from pipeline.models import load_checkpoint_weights, scored_positions_only

    class KZSFTTrainer(trl.SFTTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            model = model if model is not None else self.model
            if hasattr(model, "peft_config") or self.is_deepspeed_enabled or self.is_fsdp_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_checkpoint_weights(model, resume_from_checkpoint)

        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            with scored_positions_only():
                return super().compute_loss(*args, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            sampler = super()._get_train_sampler(train_dataset)
            if self.args.train_sampling_strategy != "group_by_length" or sampler is None:
                return sampler
            from transformers.trainer_pt_utils import LengthGroupedSampler

            assert isinstance(sampler, LengthGroupedSampler)  # what HF builds for group_by_length
            # the length column read without the dataset's transform, which would load every example's images
            ds: Any = train_dataset if train_dataset is not None else self.train_dataset
            column = self.args.length_column_name
            lengths = ds.with_format(None)[column] \
                if hasattr(ds, "with_format") and column in ds.column_names else sampler.lengths
            return _SeededLengthGroupedSampler(sampler.batch_size, list(lengths),
                                               seed=self.args.data_seed if self.args.data_seed is not None
                                               else self.args.seed)

    return KZSFTTrainer


class _SeededLengthGroupedSampler:
    """Length-grouped order drawn from (seed, epoch) alone. HF's LengthGroupedSampler draws from the global
    torch RNG when iteration starts, so a resumed run (RNG restored to its mid-epoch state) would see another
    order and skip the wrong batches; this one replays the same order and the trainer skips what was seen.

    The order is HF's: each megabatch of 50 batches runs from its longest batch to its shortest. Shuffling whole
    batches instead did not help the tiny text stage learn a fact (docs/tiny_model.md, "Text cold start"); a
    stage that needs every batch mixed sets `group_by_length: false` (random order)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, list(lengths), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


def run(cfg: SFTConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train and save `<output_dir>/model`; returns the metrics also written to metrics.json."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.models import load_model, save_model, set_pixel_bounds
    from sft.data import ChatDataset, read_text_qa
    from sft.masks import ZoomSFTCollator

    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = "bfloat16" if cfg.bf16 else "auto"
    # loaded on CPU; the Trainer moves it to this rank's device (a device_map would pin every rank to cuda:0)
    model, processor = load_model(cfg.model, dtype=dtype, device="cpu")
    set_pixel_bounds(processor, min_pixels=cfg.zoom_min_pixels, max_pixels=cfg.zoom_max_pixels)
    ckpt_dir = out / "checkpoints"
    is_main = int(os.environ.get("RANK", "0")) == 0  # data, scoring and saving happen on rank 0 only
    args = _training_args(cfg, ckpt_dir)
    # rank 0 writes the trajectory JSONL and crops; the others wait at the barrier, then read them
    with args.main_process_first(local=False, desc="SFT data"):
        items, data_stats = build_items(cfg, processor, materialize=is_main)
    dataset = ChatDataset(items)

    metrics: dict[str, Any] = {"model": cfg.model, "data": data_stats}
    eval_records = read_text_qa(cfg.eval_text_data, limit=cfg.eval_max_samples) if cfg.eval_text_data else []
    resume_from: str | None = None
    if cfg.resume == "auto" and ckpt_dir.exists():
        resume_from = get_last_checkpoint(str(ckpt_dir))
    elif cfg.resume not in ("auto", "never"):
        resume_from = cfg.resume
    train_probe = (read_text_qa(cfg.text_data, split=cfg.text_split or None, limit=cfg.eval_train_samples,
                                qtypes=cfg.text_qtypes)
                   if cfg.eval_train_samples > 0 and cfg.text_data else [])
    rephrased = read_text_qa(cfg.eval_rephrased_data) if cfg.eval_rephrased_data else []
    # the answer prior of the held-out set: from every training record the stage reads
    prior_train = (read_text_qa(cfg.text_data, split=cfg.text_split or None, qtypes=cfg.text_qtypes)
                   if eval_records and cfg.text_data and is_main else [])
    probes = {"eval": eval_records, "eval_train": train_probe, "eval_rephrased": rephrased}

    def score(name: str, when: str) -> None:
        records = probes[name]
        if not records or not is_main:
            return
        path = out / f"{name}_{when}.json"
        if when == "before" and path.exists():  # a resumed run keeps the score of the untouched model
            metrics[f"{name}_{when}"] = json.loads(path.read_text())
            return
        t = time.time()
        metrics[f"{name}_{when}"] = evaluate_text_qa(model, processor, records, max_new_tokens=cfg.eval_max_new_tokens,
                                                     batch_size=cfg.eval_batch_size)
        metrics[f"{name}_{when}"]["seconds"] = round(time.time() - t, 1)
        if name == "eval" and prior_train:
            metrics[f"{name}_{when}"]["prior"] = prior_rate(prior_train, records)
        path.write_text(json.dumps(metrics[f"{name}_{when}"], indent=2))

    score("eval", "before")
    score("eval_train", "before")
    score("eval_rephrased", "before")

    prep = prepare_model(model, cfg)
    model = prep.pop("model")
    metrics["parameters"] = prep
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset.to_hf(), processing_class=processor,
                             data_collator=ZoomSFTCollator(processor, last_turn_only=cfg.loss_turns == "last"),
                             callbacks=callbacks or [])
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.time() - t0
    model = trainer.model
    _write_rank_hash(model, trainer.state.global_step)
    if hasattr(model, "merge_and_unload"):  # LoRA: merge so every consumer loads a plain model folder
        model = model.merge_and_unload()
    if not trainer.is_world_process_zero():
        return {"global_step": trainer.state.global_step, "rank": os.environ.get("RANK")}
    save_model(model, processor, out / "model")
    history = [h for h in trainer.state.log_history if "loss" in h]
    plot_loss(history, out / "loss_curve.png", f"SFT {out.name}")
    metrics.update(
        resumed_from=resume_from, global_step=trainer.state.global_step, epochs=trainer.state.epoch,
        train_loss=result.training_loss, final_logged_loss=history[-1]["loss"] if history else None,
        first_logged_loss=history[0]["loss"] if history else None,
        train_runtime_s=wall, steps_per_second=result.metrics.get("train_steps_per_second"),
        samples_per_second=result.metrics.get("train_samples_per_second"),
        loss_history=[{"step": h["step"], "loss": h["loss"]} for h in history],
        torch_threads=torch.get_num_threads(),
    )
    score("eval", "after")
    score("eval_train", "after")
    score("eval_rephrased", "after")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    summary = {k: metrics[k] for k in ("global_step", "train_loss", "final_logged_loss", "steps_per_second")}
    for k in ("eval_before", "eval_after", "eval_train_before", "eval_train_after"):
        if k in metrics:
            summary[f"{k}_accuracy"] = metrics[k]["accuracy"]
    summary["model"] = str(out / "model")
    if not all(math.isfinite(h["loss"]) for h in metrics["loss_history"]):
        log.warning("non-finite loss in the history of %s", out)
    return summary


def _training_args(cfg: SFTConfig, ckpt_dir: Path) -> Any:
    """TRL SFTConfig of this stage (creating it sets up the process group under a launcher)."""
    import trl

    return trl.SFTConfig(
        output_dir=str(ckpt_dir), seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=cfg.learning_rate, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio if cfg.warmup_ratio > 0 else cfg.warmup_steps,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing, deepspeed=cfg.deepspeed or None,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to=list(cfg.report_to) or "none", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, assistant_only_loss=False,
        packing=False, dataloader_num_workers=cfg.dataloader_num_workers, use_cpu=not _cuda(),
        disable_tqdm=False, logging_first_step=True, length_column_name="length",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )


RANK_HASH_ENV = "KNOWZOOM_RANK_HASH_DIR"


def _write_rank_hash(model: Any, step: int) -> None:
    """Debug/test hook: with $KNOWZOOM_RANK_HASH_DIR set, every rank writes a SHA-256 of its trained weights
    there (rank<N>.json), so a test can check that the DDP ranks ended with identical models."""
    folder = os.environ.get(RANK_HASH_ENV)
    if not folder:
        return
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    r = int(os.environ.get("RANK", "0"))
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{r}.json").write_text(json.dumps({"rank": r, "sha256": h.hexdigest(), "step": step}))


__all__ = ["SFTConfig", "run", "build_items", "prepare_model", "evaluate_text_qa", "plot_loss"]
