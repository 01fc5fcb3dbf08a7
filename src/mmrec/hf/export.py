"""``mmrec export hf``: a checkpoint of any mmrec command as a Hugging Face folder.

MM-Rec becomes ``MMRecForCausalLM`` (loads after ``import mmrec``); the LLaMA-, Mistral- and GPT-style
baselines become transformers' own ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``GPT2LMHeadModel``
(load with transformers alone). Beside the weights (safetensors) and config: the tokenizer as a Hugging Face
tokenizer and a model card (README.md). The folder is written under a temporary name and renamed, so a
folder under the final name is complete.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from mmrec.hf.tokenizer import save_hf_tokenizer
from mmrec.models.checkpoint import LoadedModel, load
from mmrec.models.mmrec import MMRecLM
from mmrec.models.transformer import TransformerLM


def to_hf(loaded: LoadedModel) -> Any:
    """The transformers model of a loaded checkpoint (float32, CPU, eval mode)."""
    from transformers import GenerationConfig

    model = loaded.model.float().cpu()
    eot = getattr(loaded.tokenizer, "eot_id", None)
    if isinstance(model, MMRecLM):
        from mmrec.hf.modeling import MMRecForCausalLM

        hf = MMRecForCausalLM.from_mmrec(model, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    elif isinstance(model, TransformerLM):
        from mmrec.hf.baselines import to_hf_native

        hf = to_hf_native(model, eot)
    else:
        raise ValueError(f"cannot export a {type(model).__name__}")
    hf.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    return hf


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder of ``checkpoint`` to ``out``; returns ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out: {out} exists and is not empty; choose a new folder or pass --overwrite")
    loaded = load(checkpoint, device="cpu")
    hf = to_hf(loaded)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        hf.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            save_hf_tokenizer(loaded.tokenizer, tmp)
        (tmp / "README.md").write_text(model_card(loaded, type(hf).__name__), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def validation_bpb(loaded: LoadedModel) -> float | None:
    """Validation bits per byte that ``mmrec train`` measured at this step (eval.csv of the run), if any."""
    path = loaded.path.parent / "eval.csv"
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_bpb") and int(r["step"]) == loaded.step]
    except (OSError, ValueError, KeyError):
        return None
    return float(rows[-1]["val_bpb"]) if rows else None


def model_card(loaded: LoadedModel, hf_class: str) -> str:
    """README.md of an export: what the model is, how it was trained and measured, how to load it."""
    from mmrec.version import __version__

    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    cfg = loaded.model_config.to_dict()
    is_mmrec = isinstance(model, MMRecLM)
    bpb = validation_bpb(loaded)
    run = loaded.config
    data = run.get("data")
    sources = ", ".join(f"`{d}`" for d in data) if data else ("the built-in corpus" if run else "not recorded")
    tokens = loaded.meta.get("tokens")
    tok_name = "none (raw token ids)" if loaded.tokenizer is None else loaded.tokenizer.name
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [mmrec, {'recurrent' if is_mmrec else 'transformer'}, text-generation]",
        "---",
        "",
        f"# {loaded.arch} ({hf_class})",
        "",
        f"Exported by mmrec {__version__} (`mmrec export hf`) from `{loaded.path}`, step {loaded.step}.",
        "",
        "## Architecture",
        "",
    ]
    if is_mmrec:
        lines.append(
            "MM-Rec: a decoder-only language model whose context lives in a fixed-size recurrent state "
            "(per layer a gated linear recurrence over the last tokens and a hierarchical long-term memory "
            "written once per chunk), so memory and time per token do not grow with the context. "
            "`generate` carries that state as its cache."
        )
    else:
        lines.append(
            f"A {cfg['preset']}-style Transformer baseline of mmrec, as transformers' own `{hf_class}` "
            "(weights mapped; loads without mmrec)."
        )
    lines += ["", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in cfg.items()]
    lines += [
        "",
        f"Parameters: {params:,}.",
        "",
        "## Training",
        "",
        f"- data: {sources}",
        f"- tokens seen: {tokens:,}" if isinstance(tokens, int) else "- tokens seen: not recorded",
        f"- longest training window: {loaded.trained_seq_len:,} tokens",
        f"- tokenizer: {tok_name}",
        "",
        "## Evaluation",
        "",
        f"- validation bits per byte at this step: {bpb:.4f} (`eval.csv` of the run)"
        if bpb is not None
        else "- validation bits per byte: not measured by the command that wrote the checkpoint",
        "",
        "## Load it",
        "",
        "```python",
    ]
    if is_mmrec:
        lines.append("import mmrec  # registers model_type 'mmrec' with transformers (pip install mmrec[hf])")
    lines += [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        'ids = tok("To be, or not to be", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=50, do_sample=False)",
        "print(tok.decode(out[0]))",
        "```",
        "",
    ]
    return "\n".join(lines)
