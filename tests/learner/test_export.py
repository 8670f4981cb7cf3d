"""`ssp export`: a learner checkpoint saved at TP=1 or TP=2 becomes a HF directory whose transformers logits equal the
learner's (fp32, 1e-4) for both tiny families; the base model decides config, dtype and tokenizer files; bad
checkpoints and mismatched base models are refused with a message that names the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_worker import TOKEN_IDS, train_and_save

from ssp.learner.convert import HfTensors, hf_to_megatron
from ssp.learner.export import ExportError, export_checkpoint
from ssp.learner.model import ModelShape
from ssp.paths import PROJECT_ROOT
from ssp.processes import free_port

FAMILIES = ["tiny_llama", "tiny_qwen"]


def _export_logits(hf_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(TOKEN_IDS).logits


def _check_export(learner: torch.Tensor, hf_dir: Path, base: Path) -> float:
    """Max |logit difference| between the learner and its export; also that training moved the logits (so the
    export is not a copy of the base model)."""
    exported = _export_logits(hf_dir)
    assert (_export_logits(base) - learner).abs().max().item() > 1e-2
    diff = (exported - learner).abs().max().item()
    assert diff < 1e-4
    return diff


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_checkpoint_exports_to_matching_logits(family: str, request: pytest.FixtureRequest, par1: object,
                                                   tmp_path: Path) -> None:
    model_dir = request.getfixturevalue(family)
    checkpoints = tmp_path / "learner" / "checkpoints"
    learner = train_and_save(model_dir, checkpoints, par1, None)  # type: ignore[arg-type]
    out = export_checkpoint(checkpoints, tmp_path / "hf", base_model=model_dir, dtype="float32")
    diff = _check_export(learner, out, model_dir)
    print(f"{family} TP1 max |logit diff| {diff:.2e}")


@pytest.mark.slow
def test_tp2_checkpoint_exports_to_matching_logits(tiny_llama: Path, tiny_qwen: Path, tmp_path: Path) -> None:
    """Two gloo ranks save the checkpoints; the export runs in this process (Qwen2, through the API) and in a plain
    `ssp export` process that finds the base model in the run's learner_config.json (Llama)."""
    runs = {"llama": (tiny_llama, tmp_path / "llama" / "learner"), "qwen": (tiny_qwen, tmp_path / "qwen" / "learner")}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    model_args = [arg for model_dir, out_dir in runs.values()
                  for arg in ("--model", str(model_dir), str(out_dir / "checkpoints"))]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", str(Path(__file__).parent / "export_worker.py"), *model_args,
         "--logits", str(tmp_path / "logits.pt")],
        cwd=PROJECT_ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    llama_logits, qwen_logits = torch.load(tmp_path / "logits.pt")
    llama_step = runs["llama"][1] / "checkpoints" / "step-000003"
    assert sorted(p.name for p in llama_step.iterdir()) == ["state.json", "tp0.pt", "tp1.pt"]

    qwen_out = export_checkpoint(runs["qwen"][1] / "checkpoints", tmp_path / "qwen-hf", base_model=tiny_qwen,
                                 dtype="float32")
    qwen_diff = _check_export(qwen_logits, qwen_out, tiny_qwen)

    (runs["llama"][1] / "learner_config.json").write_text(json.dumps({"model_dir": str(tiny_llama)}))
    cli = subprocess.run([sys.executable, "-m", "ssp.cli", "export", "--checkpoint", str(llama_step), "--out",
                          str(tmp_path / "llama-hf"), "--dtype", "float32"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-4000:]
    llama_diff = _check_export(llama_logits, tmp_path / "llama-hf", tiny_llama)
    print(f"TP2 max |logit diff|: llama {llama_diff:.2e}, qwen {qwen_diff:.2e}")


def _fake_checkpoint(model_dir: Path, step_dir: Path, tp: int) -> Path:
    """A step folder as ssp.learner.checkpoint.save lays it out, its model states converted straight from `model_dir`
    (no process group needed, for the tests of the files around the weights and of refusals)."""
    shape = ModelShape.from_dir(model_dir)
    step_dir.mkdir(parents=True)
    with HfTensors(model_dir) as hf:
        for rank in range(tp):
            state = hf_to_megatron(hf.get, shape, tp=tp, tp_rank=rank, vocab_divisor=8)
            torch.save({"model": state, "optimizer": {}, "scheduler": {}}, step_dir / f"tp{rank}.pt")
    (step_dir / "state.json").write_text(json.dumps({"step": 1}))
    return step_dir


def test_dtype_config_and_tokenizer_follow_the_base_model(tiny_qwen: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    base = Path(shutil.copytree(tiny_qwen, tmp_path / "base"))
    (base / "tokenizer.json").write_text('{"model": "tiny"}')
    (base / "chat_template.jinja").write_text("{{ messages }}")
    step = _fake_checkpoint(base, tmp_path / "checkpoints" / "step-000001", tp=2)
    out = export_checkpoint(step, tmp_path / "hf", base_model=base)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the base model's
    out = export_checkpoint(step, out, base_model=base, dtype="bfloat16")  # replaces the previous export
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
        assert "lm_head.weight" not in f.keys()  # tied: transformers ties it to the embedding
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"]
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (tmp_path / "hf.tmp").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds \['notes.txt'\], which an export does not write"):
        export_checkpoint(step, out, base_model=base)


def _bad_checkpoint(kind: str, root: Path, tiny_llama: Path) -> Path:
    if kind == "missing":
        return root / "nowhere"
    if kind == "empty":
        root.mkdir()
        return root
    if kind == "incomplete":
        step = _fake_checkpoint(tiny_llama, root / "step-000001", tp=1)
        (step / "state.json").unlink()
        return step
    if kind == "rank_missing":
        step = _fake_checkpoint(tiny_llama, root / "step-000001", tp=2)
        (step / "tp1.pt").rename(step / "tp2.pt")
        return step
    root.mkdir()
    (root / "latest").write_text("step-000009")  # kind == "dangling_latest"
    return root


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", r"nowhere does not exist or is not a folder; pass a run's checkpoints folder"),
    ("empty", r"has no tp0.pt and no `latest` file"),
    ("incomplete", r"has no state.json: it is an incomplete checkpoint"),
    ("rank_missing", r"has TP rank files \['tp0.pt', 'tp2.pt'\] but not \['tp1.pt'\]"),
    ("dangling_latest", r"names step-000009, which is incomplete or missing"),
])
def test_bad_checkpoint_paths_are_named(kind: str, message: str, tiny_llama: Path, tmp_path: Path) -> None:
    path = _bad_checkpoint(kind, tmp_path / "checkpoints", tiny_llama)
    with pytest.raises(ExportError, match=message):
        export_checkpoint(path, tmp_path / "hf", base_model=tiny_llama)
    assert not (tmp_path / "hf").exists()


def test_cli_reports_a_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssp.cli import main

    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")]) == 2
    assert "ssp export: --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "Example: `ssp export --checkpoint" in capsys.readouterr().out


def test_base_model_must_be_known_and_fit(tiny_llama: Path, tiny_qwen: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    step = _fake_checkpoint(tiny_llama, tmp_path / "learner" / "checkpoints" / "step-000001", tp=2)
    with pytest.raises(ExportError, match=r"no learner_config.json in .* pass --base-model DIR"):
        export_checkpoint(step, tmp_path / "hf")
    (tmp_path / "learner" / "learner_config.json").write_text(json.dumps({"model_dir": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match=r"model_dir = '.*gone' .* has no config.json here; pass --base-model"):
        export_checkpoint(step, tmp_path / "hf")
    with pytest.raises(ExportError, match=r"disagree on the weights: .*'model.layers.0.self_attn.k_proj.bias'.* "
                                          r"only in the base"):
        export_checkpoint(step, tmp_path / "hf", base_model=tiny_qwen)
    wider = LlamaConfig.from_pretrained(tiny_llama)
    wider.intermediate_size = 128
    LlamaForCausalLM(wider).save_pretrained(tmp_path / "wider")
    with pytest.raises(ExportError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(96, 64\) once merged, "
                                          r"the base model .*wider \(128, 64\); pass --base-model DIR"):
        export_checkpoint(step, tmp_path / "hf", base_model=tmp_path / "wider")
    assert not (tmp_path / "hf").exists()
