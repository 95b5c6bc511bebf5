"""Zero-shot classification from an abpipe export alone, as a user without abpipe runs it.

Run in a fresh interpreter by tests/test_export.py: `python tests/export_zero_shot_check.py SPEC.json`
with SPEC = {"exports": [folder, ...], "images": [png, ...], "labels": [int, ...], "classnames": [...],
"templates": [...], "out": folder}. For each export folder it runs the loading code of the folder's
own model card (README.md, section "## Zero-shot classification": the code a user copies), reads the
PNGs through the card's `preprocess`, and writes `<out>/<i>.npz` with the image embeddings, the
per-prompt token ids and text embeddings, the class embeddings (prompt-averaged), the logits, the
predictions and top-1. Imports torch, timm, open_clip, safetensors, numpy, PIL and json only: an
import of abpipe's `pipeline` package fails, and the script checks none happened.
"""

from __future__ import annotations

import sys


class _NoAbpipe:
    """A meta-path finder that refuses abpipe's package, so any use of it fails loudly here."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            raise ImportError(f"{name}: the export must be usable without abpipe")
        return None


sys.meta_path.insert(0, _NoAbpipe())

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

HEADING = "## Zero-shot classification"


def card_code(readme: str) -> str:
    """The first python block after the zero-shot heading of a model card."""
    if HEADING not in readme:
        raise SystemExit(f"the model card has no '{HEADING}' section")
    rest = readme.split(HEADING, 1)[1]
    start = rest.index("```python\n") + len("```python\n")
    return rest[start : rest.index("```", start)]


def run_export(folder: str, spec: dict) -> dict:
    with open(os.path.join(folder, "README.md")) as fh:
        code = card_code(fh.read())
    ns: dict = {"__name__": "export_card"}
    here = os.getcwd()
    os.chdir(folder)  # the card's paths are relative to the export folder
    try:
        exec(compile(code, os.path.join(folder, "README.md"), "exec"), ns)
    finally:
        os.chdir(here)
    preprocess, embed_images, classifier = ns["preprocess"], ns["embed_images"], ns["classifier"]
    text, tokenizer, t = ns["text"], ns["tokenizer"], ns["t"]
    classnames, templates = spec["classnames"], spec["templates"]
    x = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in spec["images"]])
    prompts = [tpl.format(name) for name in classnames for tpl in templates]
    with torch.no_grad():
        z_img = embed_images(x)
        classes = classifier(classnames, templates)
        logits = t["logit_scale"] * z_img @ classes.T
        tokens = tokenizer(prompts)
        z_prompts = torch.nn.functional.normalize(text(tokens), dim=-1)
    pred = logits.argmax(-1).numpy()
    labels = np.asarray(spec["labels"])
    return {
        "z_img": z_img.numpy(),
        "classes": classes.numpy(),
        "logits": logits.numpy(),
        "pred": pred,
        "top1": np.float64((pred == labels).mean()),
        "tokens": tokens.numpy(),
        "z_prompts": z_prompts.numpy(),
        "input": x.numpy(),
    }


def main(spec_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    summary = []
    for i, folder in enumerate(spec["exports"]):
        got = run_export(folder, spec)
        np.savez(os.path.join(spec["out"], f"{i}.npz"), **got)
        summary.append({"export": folder, "top1": float(got["top1"]), "pred": got["pred"].tolist()})
    leaked = sorted(m for m in sys.modules if m == "pipeline" or m.startswith("pipeline."))
    assert not leaked, f"abpipe modules imported: {leaked}"
    print(json.dumps({"exports": summary, "pipeline_imported": False}))


if __name__ == "__main__":
    main(sys.argv[1])
