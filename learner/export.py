"""Export a learner checkpoint as a Hugging Face model directory (`ssp export`), at whatever TP size it was saved.

A checkpoint (ssp.learner.checkpoint) holds one megatron state per TP rank (`tpN.pt`, local-layer names, vocab padded);
a HF directory holds one full tensor per HF name. The merge is `ssp.learner.convert.megatron_state_to_hf`, the same
name and sharding rules the learner loads with (`hf_to_megatron`) and pushes with (`ssp.learner.gather`), so an export
holds the weights the learner pushes to the inference servers. Everything else the directory needs (config.json, generation config,
tokenizer) comes unchanged from the base model, the HF directory the run started from: the checkpoint stores
weights only.

Runs in a plain process (no torch.distributed group), so it can follow a training run or be run by hand:

    OUT/
      model.safetensors        every weight, in the base model's dtype (or --dtype); no lm_head for tied models
      config.json              the base model's, with its dtype entry set to the written dtype
      generation_config.json   and the tokenizer files: copied from the base model where it has them
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ssp.learner.convert import HfTensors, megatron_state_to_hf
from ssp.learner.model import ModelShape

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")
"""Files of the base model that an export carries over verbatim when the base has them."""

WRITTEN_FILES = frozenset({"model.safetensors", "config.json", *COPIED_FILES})
"""Everything an export writes: an existing OUT holding only these is a previous export, safe to replace."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""--dtype choices."""

_TP_FILE = re.compile(r"tp(\d+)\.pt")


class ExportError(ValueError):
    """A checkpoint or base model that cannot be exported; the message names the value, the rule and the fix."""


def export_checkpoint(checkpoint: Path, out: Path, *, base_model: Path | None = None,
                      dtype: str | None = None) -> Path:
    """Write the learner checkpoint `checkpoint` as a HF model directory at `out`; returns `out`.

    `checkpoint` is a run's checkpoints/ folder (its `latest` checkpoint is exported) or one step-NNNNNN folder.
    `base_model` is the HF directory the run started from; unset, it is the `model_dir` the run recorded in its
    learner_config.json (the prepared SmolLM2 when that is unset). `dtype` ("float32", "bfloat16", "float16")
    overrides the base model's. The directory is built beside `out` and renamed into place, so whatever stops an
    export leaves no half-written `out` (a previous export there is replaced).
    """
    step_dir = resolve_checkpoint(Path(checkpoint))
    if base_model is None:
        base = recorded_base_model(step_dir)
    elif not (Path(base_model) / "config.json").is_file():
        raise ExportError(f"--base-model {base_model} has no config.json; pass the Hugging Face model directory the "
                          "run started from (its learner.model_dir)")
    else:
        base = Path(base_model)
    shape = ModelShape.from_dir(base)
    out = Path(out)
    _check_replaceable(out)
    with HfTensors(base) as base_tensors:
        target_dtype = _target_dtype(dtype, base_tensors)
        weights = _merged_weights(step_dir, shape, base_tensors, target_dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    # transformers 5 writes "dtype", older versions "torch_dtype"; keep whichever the base has, correct.
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = str(target_dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_checkpoint(path: Path) -> Path:
    """The step-NNNNNN folder to export: `path` itself, or the `latest` one when `path` is a checkpoints folder."""
    from ssp.learner.checkpoint import latest

    if not path.is_dir():
        raise ExportError(f"--checkpoint {path} does not exist or is not a folder; pass a run's checkpoints folder "
                          "(LEARNER_OUT_DIR/checkpoints) or one of its step-NNNNNN folders")
    if (path / "latest").is_file():
        try:
            return latest(path)  # type: ignore[return-value]  # not None: the pointer file exists
        except FileNotFoundError as e:
            raise ExportError(str(e)) from None
    if not (path / "tp0.pt").is_file():
        raise ExportError(f"--checkpoint {path} has no tp0.pt and no `latest` file: a checkpoint folder holds "
                          "tp0.pt (one tpN.pt per TP rank) and state.json, a checkpoints folder a `latest` file; "
                          "pass LEARNER_OUT_DIR/checkpoints or one of its step-NNNNNN folders")
    if not (path / "state.json").is_file():
        raise ExportError(f"--checkpoint {path} has no state.json: it is an incomplete checkpoint (a save that did "
                          "not finish); export a complete step-NNNNNN folder or the checkpoints folder's latest")
    return path


def recorded_base_model(step_dir: Path) -> Path:
    """The model_dir the run started from, read from the learner_config.json that its ranks were launched with.

    `ssp learner train` (also under `ssp train`) writes it into the learner's out_dir, the checkpoints folder's
    parent; `ssp launch` into the run folder above that.
    """
    from ssp.paths import default_model_dir

    out_dir = step_dir.resolve().parent.parent
    for config_path in (out_dir / "learner_config.json", out_dir.parent / "learner_config.json"):
        if config_path.is_file():
            recorded = json.loads(config_path.read_text()).get("model_dir")
            base = Path(recorded) if recorded else default_model_dir()
            if not (base / "config.json").is_file():
                raise ExportError(f"{config_path}: model_dir = {str(base)!r} (the model this run started from) has "
                                  "no config.json here; pass --base-model DIR, the HF directory the run started from")
            return base
    raise ExportError(f"no learner_config.json in {out_dir} or {out_dir.parent} to say which model the run in "
                      f"{step_dir} started from; pass --base-model DIR, the HF directory the run started from")


def _check_replaceable(out: Path) -> None:
    if out.is_file():
        raise ExportError(f"--out {out} is a file; name a folder to create (or a previous export to replace)")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN_FILES)
        if foreign:
            raise ExportError(f"--out {out} exists and holds {foreign[:4]}, which an export does not write; an export "
                              "replaces only a previous export: choose a new folder or empty this one")


def _target_dtype(dtype: str | None, base: HfTensors) -> torch.dtype:
    """--dtype, else the base model's stored dtype (that of its token embedding, which every family has)."""
    if dtype is None:
        return base.dtype("model.embed_tokens.weight")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _tp_files(step_dir: Path) -> list[Path]:
    """tp0.pt ... tp{N-1}.pt in rank order (N = the TP size the checkpoint was saved with)."""
    ranks = sorted(int(m.group(1)) for p in step_dir.iterdir() if (m := _TP_FILE.fullmatch(p.name)))
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise ExportError(f"{step_dir} has TP rank files {[f'tp{r}.pt' for r in ranks]} but not "
                          f"{[f'tp{r}.pt' for r in missing]}: a checkpoint needs one file per TP rank; restore "
                          "them or export another checkpoint")
    return [step_dir / f"tp{r}.pt" for r in ranks]


def _merged_weights(step_dir: Path, shape: ModelShape, base: HfTensors,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every HF tensor of the checkpoint in `dtype`, checked name by name and shape by shape against the base."""
    files = _tp_files(step_dir)
    tp = len(files)
    fix = f"pass --base-model DIR, the HF directory the run in {step_dir} started from"
    try:
        shape.check_tp(tp)
    except ValueError as e:
        raise ExportError(f"{step_dir} was saved at tensor_parallel = {tp}, but for the base model {base.model_dir}: "
                          f"{e}; {fix}") from None
    # Memory-mapped: the optimizer state in the same files is never read.
    states = [torch.load(f, map_location="cpu", weights_only=True, mmap=True)["model"] for f in files]
    try:
        # A copy of each merged tensor, because safetensors refuses tensors that share memory (q, k and v can be
        # views of one merged qkv) and so the padded vocab rows behind the trimmed embedding are not kept.
        weights = {name: t.to(dtype, copy=True) for name, t in megatron_state_to_hf(states, shape)}
    except (KeyError, ValueError) as e:
        raise ExportError(f"{step_dir} (TP {tp}) does not fit the base model {base.model_dir}: {e}; {fix}") from None
    expected = {n for n in base.names() if not (shape.tie_word_embeddings and n == "lm_head.weight")}
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        raise ExportError(f"{step_dir} (TP {tp}) and the base model {base.model_dir} disagree on the weights: "
                          f"{missing[:4]} only in the base, {extra[:4]} only in the checkpoint; {fix}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != base.shape(name):
            raise ExportError(f"{step_dir} (TP {tp}): {name} has shape {tuple(tensor.shape)} once merged, the base "
                              f"model {base.model_dir} {base.shape(name)}; {fix}")
    return weights
