"""`ModelBackend`: the `ssp.serving.backend.Backend` of the reference server, a transformers model with continuous batching.

It glues the asyncio front to the batcher thread (`serving/batcher.py`): each request gets an asyncio.Queue that
the batcher fills with snapshots through `loop.call_soon_threadsafe`; every state change is a closure run on the
batcher thread between forward passes.

Weight updates receive broadcasts on a thread of their group's (one per group, so a group's receives run in order;
`weight_sync.JoinedGroup`), never on the batcher thread: a receive waits on the trainer, and a scheduler stuck behind
a hung trainer would neither resume nor abort when asked. A receive is bounded by serving.weight_receive_timeout_s
(the group's timeout); destroying a group that a receive still waits on abandons it at once (the trainer re-forms
with a new group after a member died mid-broadcast). What keeps the forward pass from reading half-received weights
is the caller's pause or writer lock, not the thread. Copies into the model (from tensors received into fresh
buffers, or read from disk) still run on the batcher thread, between steps.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ssp.serving import weight_sync
from ssp.serving.backend import (
    Backend,
    GenerateOutput,
    GenerateRequest,
    LoadStats,
    ModelDescription,
    PauseMode,
    UpdateResult,
)
from ssp.serving.batcher import ContinuousBatcher
from ssp.serving.config import ServingConfig
from ssp.serving.model_prep import prepare_default_model
from ssp.serving.model_runner import ModelRunner

log = logging.getLogger(__name__)


class ModelBackend(Backend):
    """A Hugging Face Llama/Qwen2 model on CPU (or CUDA), batched continuously."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.cfg = cfg
        self.model_path = Path(cfg.model) if cfg.model is not None else None
        self.runner: ModelRunner | None = None
        self.batcher: ContinuousBatcher | None = None
        self.groups: dict[str, weight_sync.JoinedGroup] = {}
        self.landings = weight_sync.FlatLandings()
        self._desc: ModelDescription | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        assert self.batcher is not None
        self.batcher.start()

    def _load(self) -> None:
        path = self.model_path if self.model_path is not None else prepare_default_model()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json); pass --model "
                                    "DIR or run `ssp model prepare` for the default")
        self.model_path = path
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        device = self.cfg.device if self.cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.runner = ModelRunner(path, device=device, dtype=getattr(torch, self.cfg.dtype))
        config = self.runner.config
        context = self.cfg.context_length or int(config.max_position_embeddings)
        self.batcher = ContinuousBatcher(
            self.runner, max_running=self.cfg.max_running_requests, max_queued=self.cfg.max_queued_requests,
            max_total_tokens=self.cfg.max_total_num_tokens, context_length=context,
            weight_version=self.cfg.weight_version, prefix_cache_tokens=self.cfg.prefix_cache_tokens)
        self._describe(path, context, device)
        log.info("loaded %s on %s (%s), context %d", path, device, self.cfg.dtype, context)

    def _describe(self, path: Path, context: int, device: str) -> None:
        assert self.runner is not None
        name = self.cfg.served_model_name or str(path)
        self._desc = ModelDescription(
            model_path=str(path), served_model_name=name, tokenizer_path=str(path),
            model_type=str(self.runner.config.model_type),
            architectures=tuple(self.runner.config.architectures or ()), context_length=context,
            max_req_input_len=context - 1, max_running_requests=self.cfg.max_running_requests,
            max_total_num_tokens=self.cfg.max_total_num_tokens, vocab_size=self.runner.vocab_size, device=device,
            dtype=self.cfg.dtype)

    async def close(self) -> None:
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)
        groups = list(self.groups.values())
        self.groups.clear()
        for joined in groups:
            await joined.destroy()

    def describe(self) -> ModelDescription:
        if self._desc is None:
            raise RuntimeError("the backend is not started yet")
        return self._desc

    async def _call(self, fn: Any) -> Any:
        assert self.batcher is not None
        return await asyncio.wrap_future(self.batcher.call(fn))

    @property
    def _batcher(self) -> ContinuousBatcher:
        assert self.batcher is not None, "the backend is not started"
        return self.batcher

    @property
    def _runner(self) -> ModelRunner:
        assert self.runner is not None, "the backend is not started"
        return self.runner

    # ---- tokenizer -------------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self._runner.tokenizer(text, add_special_tokens=True).input_ids)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._runner.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    # ---- generation ------------------------------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[GenerateOutput] = asyncio.Queue()

        def emit(out: GenerateOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        sched = self._batcher
        await self._call(lambda: sched.add(req, emit))
        finished = False
        try:
            while True:
                out = await outputs.get()
                if out.finish is not None:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            if not finished:  # the caller went away: free the slot
                sched.call(lambda: sched.abort_rid(req.rid))

    async def abort(self, rid_prefix: str, *, abort_all: bool = False) -> None:
        sched = self._batcher
        await self._call(lambda: sched.abort(rid_prefix, abort_all=abort_all))

    async def pause(self, mode: PauseMode) -> None:
        sched = self._batcher
        await self._call(lambda: sched.pause(mode))

    async def resume(self) -> None:
        sched = self._batcher
        await self._call(sched.resume)

    def is_idle(self, *, ignore_queued: bool) -> bool:
        sched = self._batcher
        return not sched.running and (ignore_queued or not sched.waiting)

    async def flush_cache(self) -> None:
        sched = self._batcher
        await self._call(sched.prefix.clear)

    def load(self) -> LoadStats:
        return self._batcher.load()

    # ---- weights ---------------------------------------------------------------------------------------------------

    @property
    def weight_version(self) -> str:
        return self._batcher.version

    def set_weight_version(self, version: str) -> None:
        # A plain attribute write (atomic under the GIL): tokens sampled from the next step on carry `version`.
        self._batcher.version = version

    async def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str) -> UpdateResult:
        if not group_name:
            return UpdateResult(False, "Failed to initialize custom process group: group_name must be non-empty.")
        if group_name in self.groups:
            return UpdateResult(False, f"Failed to initialize custom process group: group {group_name!r} already "
                                       "exists; destroy it first.")
        try:
            group = await asyncio.to_thread(
                weight_sync.init_custom_process_group, backend=backend,
                init_method=f"tcp://{master_address}:{master_port}", world_size=world_size, rank=rank_offset,
                group_name=group_name, timeout=timedelta(seconds=self.cfg.weight_receive_timeout_s))
        except Exception as e:  # noqa: BLE001 - reported to the trainer
            return UpdateResult(False, f"Failed to initialize custom process group: {e}.")
        self.groups[group_name] = weight_sync.JoinedGroup(group, group_name)
        return UpdateResult(True, "Succeeded to initialize custom process group.")

    async def destroy_weights_update_group(self, *, group_name: str) -> UpdateResult:
        joined = self.groups.pop(group_name, None)
        if joined is None:
            return UpdateResult(False, "The group to be destroyed does not exist.")
        if not await joined.destroy():
            log.warning("weight-update group %r abandoned while a receive waits on it; it is destroyed when that "
                        "receive ends (serving.weight_receive_timeout_s = %g)", group_name,
                        self.cfg.weight_receive_timeout_s)
            return UpdateResult(True, "Succeeded to destroy custom process group (abandoned: a receive still waits on "
                                      "it and fails at serving.weight_receive_timeout_s).")
        return UpdateResult(True, "Succeeded to destroy custom process group.")

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              group_name: str, load_format: str | None) -> UpdateResult:
        joined = self.groups.get(group_name)
        if joined is None:
            return UpdateResult(False, f"Failed to receive weights: no weight-update group {group_name!r}; call "
                                       "/init_weights_update_group first.")
        group = joined.group
        if load_format not in (None, "flattened_bucket"):
            return UpdateResult(False, f"Failed to receive weights: load_format {load_format!r} is not supported "
                                       "(use null or 'flattened_bucket').")
        runner = self._runner
        if load_format == "flattened_bucket":
            # NOTE: the received buffer becomes the parameters' storage (weight_sync.FlatLandings), tried first: a
            # state_dict() (~4 ms) before posting the receive would stall the wire each bucket.
            try:
                if await joined.run(lambda: self.landings.receive(group, runner.model, names=names,
                                                                         dtypes=dtypes, shapes=shapes)):
                    return UpdateResult(True, "Succeeded to update parameter online.")
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                return UpdateResult(False, f"Failed to receive weights: {e}")
        params = runner.parameters_by_name()
        if load_format is None and weight_sync.fits_in_place(params, names, dtypes, shapes):
            # NOTE: straight into the parameters: no staging buffer and no second copy (on CPU that copy cost about
            # as much as the broadcast itself, `ssp bench push`). Updates run while the server is paused or holds
            # the writer lock, so no step reads the weights meanwhile.
            try:
                await joined.run(lambda: weight_sync.receive_into(group, [params[n] for n in names]))
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                return UpdateResult(False, f"Failed to receive weights: {e}")
            return UpdateResult(True, "Succeeded to update parameter online.")
        try:
            tensors = await joined.run(lambda: weight_sync.receive(
                group, dtypes=dtypes, shapes=shapes, flattened=load_format == "flattened_bucket",
                device=runner.device))
        except Exception as e:  # noqa: BLE001 - reported to the trainer
            return UpdateResult(False, f"Failed to receive weights: {e}")
        named = list(zip(names, tensors))
        try:
            await self._call(lambda: weight_sync.load_named(runner.parameters_by_name(), named))
        except weight_sync.WeightLoadError as e:
            return UpdateResult(False, f"Failed to update parameter online: {e}. No weight was changed.")
        return UpdateResult(True, "Succeeded to update parameter online.")

    async def update_weights_from_tensor(self, *, serialized_named_tensors: list[str],
                                         load_format: str | None) -> UpdateResult:
        return UpdateResult(False, "update_weights_from_tensor passes CUDA IPC handles between processes on one GPU; "
                                   "the ssp CPU reference server does not support it. Use "
                                   "/update_weights_from_distributed (gloo) or /update_weights_from_disk.")

    async def update_weights_from_disk(self, *, model_path: str, load_format: str | None) -> UpdateResult:
        from safetensors.torch import load_file

        path = Path(model_path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            return UpdateResult(False, f"Failed to update weights: {path} has no *.safetensors files (expected a "
                                       "Hugging Face checkpoint directory).")
        runner = self._runner

        def read() -> list[tuple[str, torch.Tensor]]:
            named: list[tuple[str, torch.Tensor]] = []
            for f in files:
                named.extend(load_file(str(f)).items())
            return named

        try:
            named = await asyncio.to_thread(read)
            params = runner.parameters_by_name()
            missing = sorted(set(params) - {n for n, _ in named} - _tied_names(runner))
            if missing:
                raise weight_sync.WeightLoadError(f"the checkpoint lacks {len(missing)} parameter(s), e.g. "
                                                  f"{missing[:3]}")
            await self._call(lambda: weight_sync.load_named(params, named))
        except (weight_sync.WeightLoadError, OSError, json.JSONDecodeError) as e:
            return UpdateResult(False, f"Failed to update weights: {e}. The original weights are kept.")
        assert self._desc is not None
        self._describe(path, self._desc.context_length, self._desc.device)
        return UpdateResult(True, "Succeeded to update model weights.")

    async def get_weights_by_name(self, name: str, truncate_size: int) -> list[Any] | None:
        param = self._runner.parameters_by_name().get(name)
        if param is None:
            return None
        return param[:truncate_size].float().tolist()


def _tied_names(runner: ModelRunner) -> set[str]:
    """Parameters a checkpoint may omit because they are tied to another (lm_head with tied embeddings)."""
    return {"lm_head.weight"} if getattr(runner.config, "tie_word_embeddings", False) else set()
