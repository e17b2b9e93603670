"""`ZoomGRPOTrainer`: TRL's GRPOTrainer with two fixes found here (TRL 1.16, transformers 5.17).

1. Resume: `save_pretrained` writes Qwen2.5-VL weights under their legacy names (`visual.*`, `model.layers.*`)
   but `Trainer._load_from_checkpoint` loads the file with a plain `load_state_dict`, so every key misses and
   a resumed run silently continues from the *initial* weights (optimizer and scheduler restored). We reload
   it with `pipeline.models.load_checkpoint_weights` (shared with SFT: `from_pretrained` maps the names).
   (tests/test_rl_resume.py compares a killed-and-resumed run with an uninterrupted one.)
2. With `environment_factory`, TRL tokenizes each prompt separately and merges the image fields as Python lists;
   when a tool-calling turn then returns no image in the whole batch (every call was an error), its
   `split_pixel_values_by_grid` calls `.prod()` on that list and the step crashes. The first-turn generation
   already converts these fields to tensors, so converting them once here changes nothing else.
   (Reproduced by tests/test_rl_scripted.py::test_step_fails_above_failure_rate before the fix.)
3. vLLM colocate: TRL hands vLLM the processor's token ids, in which every image is already a run of N
   `<|image_pad|>` tokens, together with the images; vLLM's Qwen2.5-VL prompt update replaces each single pad
   token again (image i takes the first pad after image i-1's run), so the first image becomes 2N-1 pads and
   later images land inside it (TRL issue #6294, not fixed in 1.16). We give vLLM one pad per image (prompt
   images and zoom crops alike) and keep the expanded ids for the loss; vLLM re-expands each pad to the same N
   (tests/test_rl_gpu_path.py drives TRL's colocate path with a stand-in `vllm` module that applies vLLM
   0.31's rule and compares what vLLM sees with what the trainer scores). Server mode already places image
   features on the expanded runs (`VLLMGeneration._place_features`) and is left alone.
5. Length-truncated completions: TRL's `mask_truncated_completions` zeroes their `completion_mask`, which is
   also the attention mask of the loss forward. A truncated completion that holds a zoom crop then has image
   tokens outside the attention mask while its pixels stay in the batch, so Qwen2.5-VL's `get_rope_index`
   gives the later rollouts' images to the wrong rows and the step crashes ("shape mismatch: value tensor of
   shape [3, 595] cannot be broadcast to ... [3, 587]", a tiny `knowzoom run`, RL step 3). We keep TRL's flag
   off and take such completions out of the *loss* only (the loss-only `tool_mask`, and the token count the
   DAPO loss divides by), so they are still attended to as generated. (tests/test_rl_units.py.)
6. Tool calls: TRL runs one rollout's tool calls after another. Each turn, the first call starts every pending
   zoom of the batch on a thread pool (GDAL reads and Ray actor calls release the GIL) and each call then
   takes its own result, so the rollouts' state changes are the ones a sequential loop would make.
7. On CPU, TRL's fused LM head projects every position of the batch, prompt and images included; the log-prob
   forwards here project only the scored ones, as TRL does on CUDA (`pipeline.models.scored_positions_only`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer

from pipeline.models import load_checkpoint_weights, scored_positions_only

_IMAGE_FIELDS = ("pixel_values", "image_grid_thw")
log = logging.getLogger(__name__)


def collapse_image_runs(ids: list[int], pad_id: int, n_images: int) -> list[int]:
    """`ids` with every run of `pad_id` shortened to one token: vLLM's input form (it expands each pad).

    Raises ValueError when the runs do not match the images one to one (vLLM would misplace them)."""
    out: list[int] = []
    runs = 0
    prev = None
    for t in ids:
        if t == pad_id and prev == pad_id:
            continue
        if t == pad_id:
            runs += 1
        out.append(t)
        prev = t
    if runs != n_images:
        raise ValueError(f"the prompt has {runs} runs of image tokens for {n_images} images; vLLM would place "
                         f"the images wrongly")
    return out


class ZoomGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with the fixes in the module docstring; `tool_threads` > 1 runs a turn's zooms at once."""

    def __init__(self, *args: Any, tool_threads: int = 1, mask_length_truncated: bool = False,
                 **kwargs: Any) -> None:
        self.tool_threads = max(int(tool_threads), 1)
        self.mask_length_truncated = mask_length_truncated
        self._tool_pool: ThreadPoolExecutor | None = None
        super().__init__(*args, **kwargs)
        self._keep_fsdp()

    def _keep_fsdp(self) -> None:
        """Put FSDP back as accelerate's distributed type when something reset it.

        GRPOTrainer calls accelerate's `set_seed(device_specific=True)` after the Accelerator exists; that
        builds `AcceleratorState()` again, which copies PartialState's distributed type (MULTI_GPU / MULTI_CPU,
        it knows nothing of FSDP) over FSDP. `prepare_model` would then wrap the policy in DDP while the
        trainer (and TRL's FSDP-sharded reference model) expect FSDP. `AcceleratedOptimizer` does the same
        inside `accelerator.prepare`, after which checkpoints would skip the FSDP2 full-state-dict gather.
        Seen on CPU gloo ranks (tests/test_rl_gpu_path.py); the same accelerate lines run on GPUs. Called at
        init, before each training step and before each save."""
        from accelerate.utils import DistributedType

        state = self.accelerator.state
        if self.is_fsdp_enabled and getattr(state, "fsdp_plugin", None) is not None \
                and state.distributed_type != DistributedType.FSDP:
            state.distributed_type = DistributedType.FSDP

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._keep_fsdp()
        return super().training_step(*args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._keep_fsdp()
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._keep_fsdp()
        super().save_model(output_dir, _internal_call=_internal_call)

    # --- 7. the loss forward scores only the completion's positions on CPU too -----------------------------
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        with scored_positions_only():
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    # --- 3. one image placeholder per image for vLLM colocate ---------------------------------------------
    def _generate_single_turn(self, prompt_ids: list, images: Any, multimodal_fields: Any, num_generations: int,
                              has_tool_images: bool = False) -> tuple[Any, Any]:
        pad = self._image_pad_token_id
        if self.use_vllm and self.vllm_mode == "colocate" and images is not None and pad is not None:
            # only vLLM reads these ids here (TRL drops the prompt ids vLLM returns); the caller keeps its own
            prompt_ids = [collapse_image_runs(list(ids), pad, len(imgs) if imgs else 0)
                          for ids, imgs in zip(prompt_ids, images, strict=True)]
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                             has_tool_images=has_tool_images)

    # --- 5. length-truncated completions out of the loss, not out of the attention ------------------------
    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if self.mask_length_truncated:
            loss_mask_without_truncated(out, [*self.eos_token_ids, self._tokenizer.pad_token_id],
                                        self.accelerator.gather)
        return out

    # --- 6. a turn's tool calls in parallel ---------------------------------------------------------------
    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images,
                        multimodal_fields):
        if self.tool_threads <= 1 or not getattr(self, "_sync_tool_dicts", None):
            return super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, logprobs, images,
                                           multimodal_fields)
        if self._tool_pool is None:
            self._tool_pool = ThreadPoolExecutor(self.tool_threads, thread_name_prefix="zoom-tools")
        prefetch = _TurnPrefetch(self._tool_pool, completions, self._sync_tool_dicts)
        originals = [dict(d) for d in self._sync_tool_dicts]
        for i, d in enumerate(self._sync_tool_dicts):
            for name in d:
                d[name] = prefetch.wrap(i, name)
        try:
            return super()._tool_call_loop(prompts, prompt_ids, completion_ids, completions, logprobs, images,
                                           multimodal_fields)
        finally:
            for d, orig in zip(self._sync_tool_dicts, originals, strict=True):
                d.clear()
                d.update(orig)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = model if model is not None else self.model
        has_full_weights = any(os.path.exists(os.path.join(resume_from_checkpoint, f)) for f in
                               ("model.safetensors", "model.safetensors.index.json"))
        if not has_full_weights or not hasattr(model, "config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(self.accelerator.unwrap_model(model), resume_from_checkpoint)
        log.info("resumed model weights from %s", resume_from_checkpoint)

    def _tokenize_prompts(self, prompts: list) -> tuple[Any, Any, dict[str, Any]]:
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        for k in _IMAGE_FIELDS:
            v = fields.get(k)
            if isinstance(v, list) and v:
                fields[k] = torch.as_tensor(np.asarray(v))
        return prompt_ids, images, fields


def loss_mask_without_truncated(out: dict[str, Any], stop_ids: list[int], gather: Any = None) -> None:
    """Take the completions that end without a stop token (cut by max_completion_length) out of the loss:
    their loss-only `tool_mask` rows become 0 and `num_items_in_batch` (what the DAPO loss divides by) is
    recounted; `completion_mask`, the attention mask of the loss forward, keeps every generated token."""
    ids, mask = out["completion_ids"], out["completion_mask"]
    lengths = mask.sum(dim=1)
    last = ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    stops = torch.tensor(stop_ids, device=ids.device)
    truncated = (lengths > 0) & ~torch.isin(last, stops)
    tool_mask = out.get("tool_mask")
    tool_mask = torch.ones_like(mask) if tool_mask is None else tool_mask
    out["tool_mask"] = tool_mask * (~truncated).unsqueeze(1).to(tool_mask.dtype)
    n = (mask * out["tool_mask"]).sum()
    out["num_items_in_batch"] = gather(n).sum() if gather is not None else n


def _call_key(name: str, arguments: Any) -> str:
    return name + "\0" + json.dumps(arguments, sort_keys=True, default=str)


def _run_in_order(jobs: list[tuple[Any, dict, Future]]) -> None:
    for fn, args, fut in jobs:
        try:
            fut.set_result(fn(**args))
        except BaseException as e:  # handed to the caller, which TRL counts as a tool failure
            fut.set_exception(e)


class _TurnPrefetch:
    """Runs all pending tool calls of a turn on a pool when TRL asks for the first of them.

    A rollout's calls are pending when its last completion message is an assistant turn with tool calls that
    has not been executed yet (TRL executes exactly those, in order, then appends the tool messages). A turn
    that TRL rolled back (too long) keeps its already executed assistant message and is not run again."""

    def __init__(self, pool: ThreadPoolExecutor, completions: list, tool_dicts: list[dict]):
        self.pool = pool
        self.completions = completions
        self.tools = [dict(d) for d in tool_dicts]  # the real callables
        self.done: dict[int, Any] = {}  # id(assistant message) -> message, once its calls were started
        self.futures: dict[int, dict[str, list[Future]]] = {}
        self.lock = threading.Lock()

    def _start_pending(self) -> None:
        for i, comp in enumerate(self.completions):
            if not comp:
                continue
            msg = comp[-1]
            if not isinstance(msg, dict) or msg.get("role") != "assistant" or not msg.get("tool_calls"):
                continue
            if id(msg) in self.done or i >= len(self.tools):
                continue
            self.done[id(msg)] = msg
            jobs = []
            for call in msg["tool_calls"]:
                fn = call.get("function") or {}
                name, args = fn.get("name"), fn.get("arguments")
                if (call.get("type") != "function" or not isinstance(name, str) or name not in self.tools[i]
                        or not isinstance(args, dict)):
                    continue  # TRL reports these itself without calling anything
                fut: Future = Future()
                self.futures.setdefault(i, {}).setdefault(_call_key(name, args), []).append(fut)
                jobs.append((self.tools[i][name], args, fut))
            if jobs:  # one rollout's calls stay in order on one thread (they share its episode)
                self.pool.submit(_run_in_order, jobs)

    def wrap(self, i: int, name: str) -> Any:
        real = self.tools[i][name]

        def call(**arguments: Any) -> Any:
            with self.lock:
                self._start_pending()
                queue = self.futures.get(i, {}).get(_call_key(name, arguments))
                fut = queue.pop(0) if queue else None
            if fut is None:  # not started ahead (e.g. arguments TRL changed): run it here
                return real(**arguments)
            return fut.result()

        call.__name__ = name
        return call
