"""The config of `knowzoom sft`: every field with its help and its checks. Kept apart from sft/stage.py so that
`knowzoom sft --help` and config parsing import neither torch nor TRL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import hfield
from pipeline.core.launch import LaunchConfig
from pipeline.core.zoom_settings import ZoomSettings

LM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTConfig(LaunchConfig, ZoomSettings):
    """Config of `knowzoom sft` (defaults: the tiny CPU model; see configs/ for the recipes).

    With num_processes > 1 the ranks start through pipeline.launcher (DDP, or DeepSpeed with `deepspeed`);
    rank 0 materialises the trajectory data and writes every output, the other ranks wait and read."""

    output_dir: str = hfield("runs/tiny/sft_text", help="Stage folder: model/, checkpoints/, metrics, plot.")
    model: str = hfield("tiny", help="'tiny', a model folder (a previous stage's output_dir or its model/), "
                                     "or a Hugging Face id in the local cache.")
    # --- data
    text_data: list[str] = hfield([], help="TextQA JSONL files (text cold start).")
    text_split: str = hfield("", help="Keep only TextQA records of this split ('' = all records).")
    text_qtypes: list[str] = hfield([], help="Keep only TextQA records of these question types (mcq, tf, fill, "
                                             "free; [] = all), e.g. [mcq, tf]: one-token answers, whose loss long "
                                             "free answers do not drown (docs/tiny_model.md, 'Text cold start').")
    vqa_data: list[str] = hfield([], help="VQASample JSONL files (pre-warm: oracle zoom trajectories).")
    trajectory_data: list[str] = hfield([], help="Trajectory JSONL files trained as they are, every record (images "
                                                 "resolved against each file's folder): episodes rendered elsewhere, "
                                                 "e.g. make-scenes' look/ views for the tiny vision tower.")
    images_manifest: str = hfield("", help="images.jsonl of the image store holding the VQA images "
                                           "(required with vqa_data).")
    image_roots: list[str] = hfield([], help="Allowed image roots (default: the manifest's folder).")
    text_mix_ratio: float | None = hfield(None, help="With both sources: text share of the mix (text "
                                                     "resampled); None = every item of both once.")
    max_text_samples: int | None = hfield(None, help="Use at most this many TextQA records (None = all).")
    max_vqa_samples: int | None = hfield(None, help="Use at most this many VQA samples (None = all).")
    think: bool = hfield(True, help="Targets carry a <think> rationale before <answer>.")
    text_think: bool = hfield(True, help="Text QA targets carry the graph rationale in <think> (with think). The "
                              "tiny default turns it off: a 0.7M model in a CPU-minutes budget cannot learn "
                              "~170-token rationales, and its held-out answers would be cut off before <answer>.")
    max_zooms: int = hfield(5, help="Zoom calls per oracle trajectory (one per target region, at most this).")
    first_zoom_examples: str = hfield("off", help="Zooming trajectories cut after their first zoom call (the "
                                      "aiming turn): 'add' them to the whole trajectories, train 'only' on them (the "
                                      "tiny default's aiming stage, before the pre-warm; docs/tiny_model.md), 'every' "
                                      "zoom call's cut (a change pair's call on image_1 too), 'off'.")
    view_swap_data: list[str] = hfield([], help="make-scenes' swap/views.jsonl files (`--swap_views N`): each "
                                   "row trains the oracle episode of a vqa_data sample again with a synthetic view "
                                   "in place of its zoom's crop, and that view's answer (reading a view needs "
                                   "thousands of distinct views; docs/tiny_model.md).")
    loss_turns: str = hfield("all", help="Assistant turns that carry the loss: 'all', or 'last' (an agent "
                             "trajectory's answer turn alone; its zoom turns are context, as the prompt is). The "
                             "counterpart of first_zoom_examples 'only', which trains the aiming turn alone.")
    trajectory_dir: str = hfield("", help="Folder of the oracle trajectories and crops ('' = output_dir/sft_data). "
                                 "Stages training on the same vqa_data with the same zoom settings and think may "
                                 "share one: the later stage reuses what the earlier rendered (samples are kept "
                                 "by id), as the tiny pipeline's aiming and pre-warm stages do. A folder rendered "
                                 "with other settings (think, max_zooms, the zoom tool's) is refused, not reused.")
    max_length: int = hfield(4096, help="Examples longer than this many tokens (text + visual) are dropped.")
    group_by_length: bool = hfield(True, help="Batch examples of similar token length together (less padding, "
                                              "faster steps); batch order stays seeded-random.")
    # --- optimisation
    learning_rate: float = hfield(3e-3, help="Peak learning rate (AdamW).")
    adam_beta1: float = hfield(0.9, help="AdamW beta1.")
    adam_beta2: float = hfield(0.98, help="AdamW beta2.")
    weight_decay: float = hfield(0.01, help="AdamW weight decay.")
    max_grad_norm: float = hfield(1.0, help="Gradient clipping norm.")
    lr_scheduler_type: str = hfield("cosine", help="HF scheduler name: cosine, linear, constant_with_warmup, ...")
    warmup_steps: int = hfield(50, help="Warmup steps (used when warmup_ratio is 0).")
    warmup_ratio: float = hfield(0.0, help="Warmup as a fraction of training steps (overrides warmup_steps).")
    num_train_epochs: float = hfield(1.0, help="Epochs (ignored when max_steps > 0).")
    max_steps: int = hfield(0, help="Optimizer steps; 0 = num_train_epochs over the data.")
    per_device_train_batch_size: int = hfield(32, help="Micro-batch size per device.")
    gradient_accumulation_steps: int = hfield(1, help="Micro-batches per optimizer step.")
    bf16: bool = hfield(False, help="bfloat16 mixed precision (GPU).")
    gradient_checkpointing: bool = hfield(False, help="Recompute activations to save memory (large models).")
    deepspeed: str = hfield("", help="DeepSpeed JSON config path ('' = none), e.g. ZeRO-2 for the 7B; ZeRO "
                                     "stage 0-2 (the model is saved from rank 0's full copy).")
    torch_threads: int = hfield(0, help="torch CPU threads (0 = leave torch's default).")
    dataloader_num_workers: int = hfield(0, help="DataLoader worker processes.")
    # --- what trains
    freeze_vision: bool = hfield(False, help="Freeze the vision tower (the paper froze it for the 7B).")
    freeze_projector: bool = hfield(False, help="Freeze the vision→language projector (merger).")
    freeze_modules: list[str] = hfield([], help="Language-model linear layers (of q_proj k_proj v_proj o_proj "
                                                "gate_proj up_proj down_proj) left untrained in every layer, "
                                                "e.g. [q_proj, k_proj]: where attention looks stays as it was.")
    lora: bool = hfield(False, help="Train LoRA adapters on the language model instead of full weights; the "
                                    "saved model has them merged.")
    lora_r: int = hfield(16, help="LoRA rank.")
    lora_alpha: int = hfield(32, help="LoRA alpha.")
    lora_dropout: float = hfield(0.05, help="LoRA dropout.")
    lora_target_modules: list[str] = hfield(LM_PROJECTIONS, help="Language-model linear layers that get LoRA.")
    # --- bookkeeping
    logging_steps: int = hfield(10, help="Log the loss every this many steps.")
    report_to: list[str] = hfield([], help="Trainer loggers (HF `report_to`): tensorboard, wandb, mlflow, ... "
                                           "([] = none); tensorboard writes under <output_dir>/checkpoints/runs.")
    save_steps: int = hfield(100, help="Checkpoint every this many steps (resume point after a kill).")
    save_total_limit: int = hfield(2, help="Checkpoints kept.")
    resume: str = hfield("auto", help="'auto' = resume from the last checkpoint in output_dir/checkpoints if "
                                      "any; 'never'; or a checkpoint folder.")
    # --- held-out text evaluation (before/after)
    eval_text_data: list[str] = hfield([], help="Held-out TextQA JSONL scored before and after training.")
    eval_max_samples: int = hfield(200, help="At most this many held-out questions.")
    eval_max_new_tokens: int = hfield(128, help="Generation budget per held-out question.")
    eval_batch_size: int = hfield(32, help="Held-out generation batch size.")
    eval_rephrased_data: list[str] = hfield([], help="TextQA JSONL of held-out rephrasings of trained facts (e.g. "
                                                     "make-scenes' kg_facts_test.jsonl), scored before/after beside "
                                                     "eval_text_data (whose facts are held out by entity).")
    eval_train_samples: int = hfield(0, help="Also score this many training TextQA before/after (memorisation "
                                             "check beside the held-out score; 0 = off).")

    def trajectory_folder(self) -> Path:
        """Where the oracle trajectories are rendered and read (`trajectory_dir`, else output_dir/sft_data)."""
        return Path(self.trajectory_dir) if self.trajectory_dir else Path(self.output_dir) / "sft_data"

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.text_data and not self.vqa_data and not self.trajectory_data:
            p.append("text_data/vqa_data/trajectory_data: all empty; give TextQA, VQASample and/or Trajectory JSONL "
                     "files")
        for f in self.trajectory_data:
            if not Path(f).is_file():
                p.append(f"trajectory_data: {f} does not exist")
        from pipeline.core.records import TEXT_QTYPES

        bad = [t for t in self.text_qtypes if t not in TEXT_QTYPES]
        if bad:
            p.append(f"text_qtypes: {bad} unknown; use some of {', '.join(TEXT_QTYPES)}")
        if self.vqa_data and not self.images_manifest:
            p.append("images_manifest: required with vqa_data; give the images.jsonl written by make-scenes")
        if self.text_mix_ratio is not None and not 0.0 < self.text_mix_ratio < 1.0:
            p.append("text_mix_ratio: must be in (0, 1) or null")
        if self.zoom_frame not in ("shown_pixels", "norm1000"):
            p.append("zoom_frame: use shown_pixels or norm1000")
        from sft.data import FIRST_ZOOM_MODES

        if self.first_zoom_examples not in FIRST_ZOOM_MODES:
            p.append(f"first_zoom_examples: {self.first_zoom_examples!r}; use one of {', '.join(FIRST_ZOOM_MODES)}")
        elif self.first_zoom_examples != "off" and not self.vqa_data:
            p.append("first_zoom_examples: needs vqa_data (it cuts the oracle zoom trajectories)")
        if self.view_swap_data and not self.vqa_data:
            p.append("view_swap_data: needs vqa_data (a swapped view replaces the crop of a sample's oracle episode)")
        for f in self.view_swap_data:
            if not Path(f).is_file():
                p.append(f"view_swap_data: {f} does not exist; run make-scenes with --swap_views N")
        bad = [m for m in self.freeze_modules if m not in LM_PROJECTIONS]
        if bad:
            p.append(f"freeze_modules: {bad} unknown; use some of {', '.join(LM_PROJECTIONS)}")
        if self.lora and self.freeze_modules:
            p.append("freeze_modules: with lora only the adapters train already; leave it empty or set lora: false")
        if self.loss_turns not in ("all", "last"):
            p.append(f"loss_turns: {self.loss_turns!r}; use 'all' or 'last'")
        if not 0 < self.zoom_min_pixels <= self.zoom_max_pixels:
            p.append("zoom_min_pixels/zoom_max_pixels: need 0 < zoom_min_pixels <= zoom_max_pixels")
        for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_length", "logging_steps", "save_steps", "save_total_limit", "eval_batch_size",
                     "max_zooms"):
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be > 0")
        if self.max_steps < 0:
            p.append(f"max_steps: {self.max_steps} is not a step count; give a positive number of optimizer steps, "
                     "or 0 to train num_train_epochs over the data")
        elif self.max_steps == 0 and self.num_train_epochs <= 0:
            p.append("max_steps/num_train_epochs: give max_steps > 0 or num_train_epochs > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            p.append("warmup_ratio: must be in [0, 1)")
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            p.append(f"resume: {self.resume} is not 'auto', 'never' or an existing checkpoint folder")
        if self.deepspeed and not Path(self.deepspeed).exists():
            p.append(f"deepspeed: {self.deepspeed} does not exist; give a DeepSpeed JSON or ''")
        elif self.deepspeed and _zero_stage(self.deepspeed) > 2:
            p.append(f"deepspeed: {self.deepspeed} is ZeRO stage 3; SFT saves the model from rank 0's full "
                     "copy, so use stage 0-2 (ZeRO-2 fits the 7B on 8 x 80 GB: see `knowzoom plan`)")
        if self.lora and self.lora_r <= 0:
            p.append("lora_r: must be > 0")
        p += report_to_problems(self.report_to)
        return p


# the loggers of transformers 5.17's `report_to` (integrations.INTEGRATION_TO_CALLBACK) and the module each needs
REPORTERS = {"azure_ml": "azureml", "comet_ml": "comet_ml", "mlflow": "mlflow", "neptune": "neptune",
             "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "codecarbon": "codecarbon",
             "clearml": "clearml", "dagshub": "dagshub", "flyte": "flytekit", "dvclive": "dvclive",
             "swanlab": "swanlab", "kubeflow": "kubeflow"}


def report_to_problems(report_to: list[str]) -> list[str]:
    """Unknown or uninstalled `report_to` loggers, as config problems (the Trainer would fail later)."""
    import importlib.util

    p = []
    for name in report_to:
        if name in ("none", "all"):
            continue
        if name not in REPORTERS:
            p.append(f"report_to: unknown logger {name!r}; use some of {', '.join(REPORTERS)} (or [] for none)")
        elif importlib.util.find_spec(REPORTERS[name]) is None and not (
                name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None):
            p.append(f"report_to: {name} is not installed (pip install {REPORTERS[name]})")
    return p


def _zero_stage(path: str) -> int:
    """ZeRO stage of a DeepSpeed JSON (0 when unreadable; validate() reports a missing file)."""
    try:
        return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
