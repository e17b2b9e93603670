"""Model loading for every stage, including the embedded tiny Qwen2.5-VL that runs the pipeline on a CPU.

`load_model("tiny")` builds (once, offline, deterministically) a ~0.8M-parameter Qwen2.5-VL with random
weights, a byte-level BPE tokenizer trained locally on project text, all Qwen-VL special tokens, TRL's
Qwen2.5-VL chat template (the same template the 7B ships, so tiny and 7B run the same code) and a PIL image
processor; the build is cached under $KNOWZOOM_CACHE (default ~/.cache/knowzoom) keyed by a hash of its
spec and corpus. Any local folder or Hugging Face id already in the local HF cache loads through the same
function; nothing is ever downloaded.

Without torchvision (never installed on CPU hosts) transformers cannot build Qwen2.5-VL's video processor,
so `load_processor` uses `QwenVLImageProcessor`, a small `Qwen2_5_VLProcessor` subclass without one; it
saves as a standard `Qwen2_5_VLProcessor` folder so vLLM / AutoProcessor read it on GPU hosts.

Over 500 lines on purpose: it is the one model contract every stage imports (build, resolve, load, save, resume
weights); the tiny build's cache key hashes the code and corpus beside it, and splitting the build from the
loader would make `load_model("tiny")` reach across modules for the same spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import StageConfig, Validated, hfield
from pipeline.core.errors import CheckpointMismatchError, ConfigError, ModelNotFoundError

if TYPE_CHECKING:  # heavy imports stay lazy: `knowzoom make-scenes` must not import torch
    from transformers import PreTrainedModel, ProcessorMixin

log = logging.getLogger(__name__)

TINY = "tiny"
# Bump when the tiny build changes in a way the spec hash does not see (code, corpus builder).
TINY_BUILD_VERSION = 3

# Qwen2.5-VL's special tokens (same strings and roles as the released tokenizer).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Added (non-special) tokens: protocol tags survive `skip_special_tokens=True` decoding, as in Qwen's tokenizer.
PROTOCOL_TOKENS = [
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<answer>", "</answer>",
]
# Qwen2's pre-tokenizer split: digits one by one, letters with one leading char, punctuation runs.
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)


@dataclass
class TinySpec(Validated):
    """Architecture of the embedded tiny Qwen2.5-VL (defaults: the 0.7–0.8M-parameter model of DESIGN.md)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 8192
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_heads: int = 2
    patch_size: int = 14
    spatial_merge_size: int = 2
    min_pixels: int = 3136  # 4 * 28 * 28
    max_pixels: int = 50176  # 224 * 224 = 64 visual tokens after merging
    corpus_files: tuple[str, ...] = ()
    prompt_tokens: bool = True  # each fixed instruction text is one token (`prompt_token_texts`)

    config_label = "tiny model spec"

    def validate(self) -> list[str]:
        p = []
        if self.hidden_size % self.num_attention_heads:
            p.append("hidden_size: must be divisible by num_attention_heads")
        elif (self.hidden_size // self.num_attention_heads) % 4:
            p.append("hidden_size / num_attention_heads: head dim must be a multiple of 4 (multimodal RoPE)")
        if self.num_attention_heads % self.num_key_value_heads:
            p.append("num_key_value_heads: must divide num_attention_heads")
        if self.vision_hidden_size % self.vision_num_heads:
            p.append("vision_hidden_size: must be divisible by vision_num_heads")
        if self.vocab_size < 512:
            p.append("vocab_size: at least 512 (256 bytes + special tokens + merges)")
        if not 0 < self.min_pixels <= self.max_pixels:
            p.append("min_pixels/max_pixels: need 0 < min_pixels <= max_pixels")
        return p


# ----------------------------------------------------------------------------------------------- paths
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where built models live: `cache_dir`, else $KNOWZOOM_CACHE, else ~/.cache/knowzoom."""
    root = cache_dir or os.environ.get("KNOWZOOM_CACHE") or Path.home() / ".cache" / "knowzoom"
    return Path(root).expanduser()


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def has_video_processor(path: Path) -> bool:
    """Whether a model folder describes a video processor. A folder saved where torchvision is absent (every CPU
    host here) has none, and `AutoProcessor` refuses it where torchvision is installed (every GPU host: the
    `gpu` extra pins it): "Can't load video processor", seen on an H200. Such a folder is loaded from its parts,
    with a default video processor there (`make_processor`)."""
    # transformers 5.17 (`BaseVideoProcessor.get_video_processor_dict`) reads the "video_processor" entry of
    # processor_config.json, else video_preprocessor_config.json, else the legacy preprocessor_config.json (the
    # layout of the Hugging Face Qwen2.5-VL repositories)
    if (path / "video_preprocessor_config.json").exists() or (path / "preprocessor_config.json").exists():
        return True
    try:
        return "video_processor" in json.loads((path / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------- corpus
def _builtin_corpus() -> list[str]:
    """Deterministic project text: protocol strings, question templates, Earth-science vocabulary."""
    lines: list[str] = []
    colors = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "gray", "brown"]
    objects = ["building", "car", "ship", "airplane", "tree", "pool", "tank", "road", "field", "house", "boat"]
    for i, c in enumerate(colors):
        o = objects[i % len(objects)]
        lines.append(f"What is the color of the {o} in the image? (A) {c} (B) {colors[i - 1]} (C) "
                     f"{colors[i - 2]} (D) {colors[i - 3]}")
        lines.append(f"How many {o}s are there in the image? Answer with a number.")
        lines.append(f"Is there a {c} {o} in the top left of the image? true or false")
    for x in range(0, 1000, 37):
        y = (x * 7) % 997
        call = {"name": "zoom_in", "arguments": {"bbox": [x, y, x + 56, y + 84], "source": f"obs_{x % 5}"}}
        lines.append(f"<think>The object is small, so I zoom in.</think><tool_call>{json.dumps(call)}</tool_call>")
        lines.append(f"<tool_response>obs_{x % 5 + 1}: crop of image_0 at [{x}, {y}, {x + 56}, {y + 84}]"
                     "</tool_response>")
    lines += [
        "<think>The crop shows the answer clearly.</think><answer>B</answer>",
        "<answer>true</answer> <answer>false</answer> <answer>12</answer> <answer>AC</answer>",
        "You are a helpful assistant. You can call the zoom_in tool with a bounding box [x0, y0, x1, y1] in "
        "the pixel frame of an image or an earlier observation to see that region at a higher resolution.",
        "Select the best answer for the multiple-choice question based on the image. Only respond with the "
        "letter corresponding to the correct answer (A, B, C, D). The answer is:",
        "Answer the question step by step, then give the final answer inside <answer></answer>.",
        "Perception Reasoning Object color Object classification Counting Land use Change detection "
        "Overall counting Regional counting Anomaly detection Route planning Spatial relationship",
    ]
    lines += _protocol_corpus()
    try:  # real Earth-science vocabulary installed with the project (spyndex is a main dependency)
        import spyndex

        for name in sorted(spyndex.indices):
            idx = spyndex.indices[name]
            lines.append(f"{name} is the {idx.long_name}; its formula is {idx.formula}; domain: "
                         f"{idx.application_domain}; bands: {', '.join(idx.bands)}.")
    except Exception as e:  # pragma: no cover - optional richness only
        log.debug("spyndex not usable for the tokenizer corpus: %s", e)
    return lines


def prompt_token_texts() -> list[str]:
    """The instruction texts that prompts repeat word for word: the tool system prompt of each box frame, the
    image questions' answer instruction, the text QA instructions and the default system prompt.

    With `TinySpec.prompt_tokens` the tiny tokenizer codes each as one added token, so a 169-token system
    prompt costs one position: image examples are a third shorter (aiming: 501 → 298 tokens) and every stage
    1.2-1.7x faster (docs/tiny_model.md). A text that differs in one character tokenizes as before. The 7B's
    tokenizer is untouched."""
    from tools import protocol

    texts = [protocol.system_prompt(f) for f in protocol.FRAMES] + [protocol.DEFAULT_INSTRUCTION]
    texts += list(protocol.TEXT_INSTRUCTIONS.values()) + ["You are a helpful assistant."]
    return list(dict.fromkeys(texts))


def _protocol_corpus(repeat: int = 20) -> list[str]:
    """The exact texts every prompt repeats (tool system prompt, instructions, role headers), repeated so
    BPE merges them into few tokens: sequences get shorter and CPU steps faster."""
    texts = ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>tool\n",
             "You are a helpful assistant.", "The choices are listed below:", "image_0 (224x224):",
             "obs_1: zoom of image_0 [0, 0, 56, 56], shown at 224x224."]
    try:  # the tool protocol's own strings (tools/ is part of the project; guarded so models.py stands alone)
        from tools import protocol

        texts += [protocol.system_prompt(f) for f in ("shown_pixels", "norm1000")]
        texts.append(protocol.DEFAULT_INSTRUCTION)
        texts += list(protocol.TEXT_INSTRUCTIONS.values())
        texts += [protocol.ZOOM_THINK, protocol.ANSWER_THINK, protocol.DIRECT_THINK,
                  protocol.ZOOM_THINK_AT.format(where="column 7, row 3", box="[741, 341, 759, 359]"),
                  protocol.ANSWER_THINK_SEES.format(sees="3 red ships on water")]
    except Exception as e:  # pragma: no cover
        log.debug("tools.protocol not usable for the tokenizer corpus: %s", e)
    return texts * repeat


def _file_corpus(paths: tuple[str, ...] | list[str]) -> list[str]:
    """Text of extra corpus files: JSONL records (string fields, lists of strings) or plain text lines."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ConfigError(f"corpus_files: {path} does not exist; give existing JSONL or text files")
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    out.append(line)
                    continue
                for v in d.values() if isinstance(d, dict) else []:
                    if isinstance(v, str):
                        out.append(v)
                    elif isinstance(v, list):
                        out.extend(x for x in v if isinstance(x, str))
            else:
                out.append(line)
    return out


def tiny_corpus(spec: TinySpec) -> list[str]:
    return _builtin_corpus() + _file_corpus(spec.corpus_files)


def tiny_cache_key(spec: TinySpec, seed: int) -> str:
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps({"spec": dataclasses.asdict(spec), "seed": seed, "v": TINY_BUILD_VERSION,
                         "transformers": transformers.__version__}, sort_keys=True, default=str).encode())
    for line in tiny_corpus(spec):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------- builders
def build_tiny_tokenizer(spec: TinySpec) -> Any:
    """Byte-level BPE (Qwen2 split rules) trained locally; returns a transformers fast tokenizer."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    prompts = prompt_token_texts() if spec.prompt_tokens else []
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(PROTOCOL_TOKENS) - len(prompts), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, min_frequency=2,
    )
    tok.train_from_iterator(tiny_corpus(spec), trainer)
    # the longest added token that matches wins, so a system prompt with <tool_call> inside stays one token
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TOKENS + prompts])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=spec.max_position_embeddings,
        padding_side="right", clean_up_tokenization_spaces=False,
    )
    return fast


def chat_template() -> str:
    """TRL's shipped Qwen2.5-VL template (identical to the one in Qwen/Qwen2.5-VL-7B-Instruct)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja").read_text(encoding="utf-8")


def _processor_class() -> type:
    """`Qwen2_5_VLProcessor` without the video processor (which needs torchvision)."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    global _QwenVLImageProcessor
    if _QwenVLImageProcessor is not None:
        return _QwenVLImageProcessor

    class QwenVLImageProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor for images and text only; saves as a standard Qwen2_5_VLProcessor folder."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                     **kwargs: Any) -> None:
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False,
                            **kwargs: Any) -> list[str]:
            out = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
            cfg = Path(save_directory) / "processor_config.json"
            data = json.loads(cfg.read_text()) if cfg.exists() else {}
            data["processor_class"] = "Qwen2_5_VLProcessor"
            cfg.write_text(json.dumps(data, indent=2))
            return out

    _QwenVLImageProcessor = QwenVLImageProcessor
    return QwenVLImageProcessor


_QwenVLImageProcessor: type | None = None


def make_processor(tokenizer: Any, image_processor: Any, template: str | None = None) -> ProcessorMixin:
    """A Qwen2.5-VL processor from parts (without a video processor when torchvision is absent)."""
    template = template if template is not None else (getattr(tokenizer, "chat_template", None) or chat_template())
    if torchvision_available():
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # not in the
        # type-checking names of transformers.models.qwen2_vl, though exported at run time

        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def build_tiny_model(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Build the tiny Qwen2.5-VL (random weights, seeded) + tokenizer + processor into `out_dir`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = spec or TinySpec()
    spec.check()
    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(spec)
    tid = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden_size // spec.num_attention_heads
    half = head_dim // 2  # mrope sections (temporal, height, width) sum to head_dim / 2
    sect = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sect},
            tie_word_embeddings=True, bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"),
            pad_token_id=tid("<|endoftext|>"), max_window_layers=spec.num_hidden_layers,
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size, num_heads=spec.vision_num_heads,
            patch_size=spec.patch_size, spatial_merge_size=spec.spatial_merge_size, temporal_patch_size=2,
            window_size=spec.patch_size * spec.spatial_merge_size * 4, out_hidden_size=spec.hidden_size,
            fullatt_block_indexes=[spec.vision_depth - 1],
        ),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    model.generation_config.bos_token_id = tid("<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size, temporal_patch_size=2,
    )
    template = chat_template()
    tokenizer.chat_template = template
    processor = make_processor(tokenizer, image_processor, template)
    save_model(model, processor, out)
    return out


def save_processor(processor: Any, out_dir: str | Path) -> Path:
    """Save a processor (or tokenizer) beside a model's weights; clears tokenizer truncation/padding first (SFT
    leaves them set and a saved truncation would silently cut prompts at load time) and writes the chat template
    as chat_template.jinja. Every stage that saves a model (sft, rl) saves its processor through here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "_tokenizer", None) or getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    processor.save_pretrained(out)
    if getattr(processor, "chat_template", None):
        (out / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    return out


def save_model(model: Any, processor: Any, out_dir: str | Path) -> Path:
    """Save a loadable model folder: the weights (a LoRA model merged first) and the processor (`save_processor`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):  # a LoRA model: save merged weights so every consumer can load it
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    return save_processor(processor, out)


def load_checkpoint_weights(model: Any, checkpoint: str | Path) -> None:
    """Copy a Trainer checkpoint's weights into `model` in place, strictly (the resume of sft and rl).

    transformers 5.17 saves Qwen2.5-VL checkpoints with the legacy key names (`visual.*`, `model.layers.*`) but
    `Trainer._load_from_checkpoint` loads them with a plain `load_state_dict`, so every key misses and training
    silently continues from the initial weights (optimizer and scheduler restored). `from_pretrained` maps the
    names; anything still missing (but a tied `lm_head.weight`) or unexpected raises."""
    dtype = next(model.parameters()).dtype
    fresh = type(model).from_pretrained(str(checkpoint), dtype=dtype)
    result = model.load_state_dict(fresh.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, "
                                      f"unexpected {result.unexpected_keys[:5]}")
    del fresh


@contextlib.contextmanager
def scored_positions_only() -> Iterator[None]:
    """TRL's fused LM head scores only the labelled positions on every device (the loss of sft and rl).

    TRL 1.16's `add_fused_lm_head` projects only the positions with a label on CUDA/XPU (its Triton check), but
    every position of the batch elsewhere, so that Neuron keeps one tile shape. On CPU that is the prompt, the
    images and the padding too: a tiny zoom episode has ~18 % of its positions labelled, and the all-position
    projection, entropy and backward took ~40 % of each SFT step (tests/benchmarks/bench_loss_positions.py).
    The per-token values are the same either way (each row's log-softmax is its own, and the skipped rows are
    zeroed by TRL afterwards), so here the CPU takes the CUDA branch; the kernels keep their own device check."""
    from trl.trainer import utils as trl_utils

    use_triton = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    try:
        yield
    finally:
        trl_utils._use_triton = use_triton


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tiny_model_path(cache_dir: str | Path | None = None, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Path of the cached tiny build, building it first when absent (atomic, lock-protected)."""
    spec = spec or TinySpec()
    root = cache_root(cache_dir)
    path = root / f"tiny-{tiny_cache_key(spec, seed)}"
    if (path / "config.json").exists():
        return path
    with _file_lock(root / ".tiny.lock"):
        if (path / "config.json").exists():
            return path
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
        try:
            build_tiny_model(tmp, seed=seed, spec=spec)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built the tiny model into %s", path)
    return path


# ------------------------------------------------------------------------------------------- resolving
def resolve_model_path(spec: str, cache_dir: str | Path | None = None) -> Path:
    """"tiny" → the cached tiny build; a folder with config.json → itself (or its `model/` subfolder, so a
    stage's output_dir works); an HF id → its snapshot in the local HF cache. Else ModelNotFoundError."""
    if spec == TINY:
        return tiny_model_path(cache_dir)
    p = Path(spec).expanduser()
    if (p / "config.json").exists():
        return p
    if (p / "model" / "config.json").exists():
        return p / "model"
    if p.exists():
        raise ModelNotFoundError(
            f"{p} exists but holds no model (no config.json); point at a saved model folder, e.g. "
            f"<stage output_dir>/model"
        )
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True, cache_dir=cache_dir))
        except Exception as e:  # LocalEntryNotFoundError and friends
            raise ModelNotFoundError(
                f"model {spec!r} is not in the local Hugging Face cache and cannot be downloaded here (no "
                f"network). Copy it onto this machine (e.g. `huggingface-cli download {spec} --local-dir "
                f"/models/{spec.split('/')[-1]}` on a connected host) and pass that folder as the model, or "
                f"use model: tiny."
            ) from e
    raise ModelNotFoundError(
        f"model {spec!r} not found: give 'tiny', a local folder with config.json, or an HF id that is "
        f"already in the local Hugging Face cache (models cannot be downloaded here)"
    )


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ConfigError(f"dtype: {dtype!r} unknown; use auto, float32, bfloat16 or float16") from None


def load_processor(spec: str = TINY, *, max_pixels: int | None = None, min_pixels: int | None = None,
                   cache_dir: str | Path | None = None) -> ProcessorMixin:
    """The processor of a model spec; `max_pixels`/`min_pixels` override the image size bounds (set them to
    the zoom tool's so images the tool already sized are not resized again)."""
    path = resolve_model_path(spec, cache_dir)
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    if model_type not in ("qwen2_5_vl", "qwen2_vl") or (torchvision_available() and has_video_processor(path)):
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise ModelNotFoundError(f"cannot load a processor from {path}: {e}") from e
    else:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        template = None
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        processor = make_processor(tokenizer, image_processor, template)
    if max_pixels is not None or min_pixels is not None:
        set_pixel_bounds(processor, min_pixels=min_pixels, max_pixels=max_pixels)
    return processor


def set_pixel_bounds(processor: Any, *, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Set the image processor's pixel bounds (smart_resize keeps images already within them unchanged)."""
    ip = processor.image_processor
    size = dict(ip.size) if not hasattr(ip.size, "__dataclass_fields__") else dataclasses.asdict(ip.size)
    size = {k: v for k, v in size.items() if v is not None}
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else size
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and hasattr(ip, name):
            setattr(ip, name, int(v))


def load_model(spec: str = TINY, *, dtype: str = "auto", device: str = "cpu",
               cache_dir: str | Path | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load (model, processor) for "tiny", a local folder (a stage's output_dir or its model/) or a cached
    HF id; raises ModelNotFoundError with what to do when it is not on this machine."""
    from transformers import AutoModelForImageTextToText

    path = resolve_model_path(spec, cache_dir)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype, device), "local_files_only": True}
    if device not in ("cpu",):
        kwargs["device_map"] = device
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load a model from {path}: {e}") from e
    processor = load_processor(str(path))
    return model, processor


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ the stage
@dataclass
class BuildModelConfig(StageConfig):
    """`knowzoom build-model`: build the embedded tiny Qwen2.5-VL into `<output_dir>/model`."""

    output_dir: str = hfield("runs/tiny/base", help="Folder; the model is saved in <output_dir>/model.")
    vocab_size: int = hfield(2048, help="Tokenizer size (byte-level BPE trained on the corpus).")
    hidden_size: int = hfield(128, help="Language model hidden size.")
    intermediate_size: int = hfield(256, help="Language model MLP size.")
    num_hidden_layers: int = hfield(2, help="Language model layers.")
    num_attention_heads: int = hfield(4, help="Attention heads (head dim must be a multiple of 4).")
    num_key_value_heads: int = hfield(2, help="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = hfield(8192, help="Longest sequence the model accepts.")
    vision_depth: int = hfield(2, help="Vision tower blocks.")
    vision_hidden_size: int = hfield(64, help="Vision tower width.")
    vision_intermediate_size: int = hfield(128, help="Vision tower MLP size.")
    vision_num_heads: int = hfield(2, help="Vision tower heads.")
    min_pixels: int = hfield(3136, help="Image processor minimum pixels (4*28*28).")
    max_pixels: int = hfield(50176, help="Image processor maximum pixels (224*224 = 64 visual tokens).")
    corpus_files: list[str] = hfield([], help="Extra JSONL/text files to train the tokenizer on (e.g. the "
                                              "build-qa output); empty = the built-in project corpus only.")
    prompt_tokens: bool = hfield(True, help="Code each fixed instruction text (the tool system prompt, the "
                                            "answer instructions) as one token: image examples a third shorter.")

    def spec(self) -> TinySpec:
        names = {f.name for f in dataclasses.fields(TinySpec)} - {"corpus_files", "patch_size",
                                                                  "spatial_merge_size"}
        return TinySpec(**{n: getattr(self, n) for n in names}, corpus_files=tuple(self.corpus_files))

    def validate(self) -> list[str]:
        problems = super().validate() + self.spec().validate()
        for f in self.corpus_files:
            if not Path(f).exists():
                problems.append(f"corpus_files: {f} does not exist; give existing files or leave it empty")
        return problems


def run(cfg: BuildModelConfig) -> dict[str, Any]:
    """Build the tiny model into <output_dir>/model and report its size."""
    out = Path(cfg.output_dir) / "model"
    tmp = Path(cfg.output_dir) / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp, seed=cfg.seed, spec=cfg.spec())
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    model, processor = load_model(str(out))
    return {"model": str(out), "parameters": count_parameters(model), "vocab_size": len(processor.tokenizer)}


__all__ = [
    "TINY", "TinySpec", "BuildModelConfig", "run", "load_model", "load_processor", "build_tiny_model",
    "save_model", "make_processor", "set_pixel_bounds", "resolve_model_path", "tiny_model_path",
    "chat_template", "count_parameters", "cache_root",
]
