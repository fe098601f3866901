"""Logits fidelity of the FX and PT2E backends on the same seeded model, and where PT2E's extra
quantizers (the residual stream after each add) cost it.

For each model (seeded init, w8a8, the plugin's default data: 4 calibration batches of 8, the
evaluation set), prints:

- the logits' SQNR against the BN-folded float model under FX (the anchor) and under PT2E, the
  difference, the quantizer counts, and whether every weight scale is identical;
- PT2E again with the residual-stream quantizers (those of add outputs) switched off;
- for token models (3-d activations, row 0 a [CLS] token the head reads), the first and last
  residual-stream quantizer: each row group's std, the SQNR of the quantizer's own rounding per
  row group (on the float tensor), and the error accumulated there by all quantizers upstream.

Not a test; nothing is asserted. Usage:
python benchmarks/backend_fidelity.py [MODEL ...] [--threads 2]
(default models: timm:vit_tiny_patch16_224 resnet18)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepared_and_calibrated(zoo, loaders, backend):
    from eqcore.prepare.calibrate import calibrate
    from eqcore.prepare.quantize import prepare

    prepared = prepare(zoo.model, "w8a8", zoo.example_inputs(), backend=backend)
    calibrate(prepared.model, loaders.calib)
    return prepared


def weight_scales(model):
    return {
        name: module.weight_fake_quant.calculate_qparams()[0]
        for name, module in model.named_modules()
        if hasattr(module, "weight_fake_quant")
    }


def stream_quantizers(prepared) -> list[str]:
    """PT2E quantizers of add outputs: the residual stream."""
    names = []
    for node in prepared.model.graph.nodes:
        if node.op == "call_module" and node.target in prepared.quantizers:
            source = node.args[0]
            if getattr(source, "target", None) in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
                names.append(node.target)
    return names


def quantizer_inputs(model, names, x, *, fake_quant: bool):
    from eqcore.quant.toggles import disable_fake_quant, enable_fake_quant

    seen = {}
    modules = {name: model.get_submodule(name) for name in names}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
             for n, m in modules.items()]
    model.apply(enable_fake_quant if fake_quant else disable_fake_quant)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.apply(enable_fake_quant)
    return seen


def compare(name: str) -> None:
    from eqcore.analysis.evaluate import collect_logits
    from eqcore.analysis.metrics import sqnr
    from eqcore.models.loaders import get_loaders
    from eqcore.models.zoo import get_model

    torch.manual_seed(0)
    zoo = get_model(name, "none", seed=0)
    loaders = get_loaders(zoo.default_data, zoo.spec, batch_size=8, calib_batches=4, seed=0)
    inputs = [batch[0] for batch in loaders.eval]
    from eqcore.errors import EQError

    results = {}
    for backend in ("fx", "pt2e"):
        try:
            prepared = prepared_and_calibrated(zoo, loaders, backend)
        except EQError as exc:
            print(f"{name}: no {backend} ({str(exc)[:100]})")
            continue
        reference = collect_logits(prepared.float_model, inputs, "cpu").logits
        logits = collect_logits(prepared.model, inputs, "cpu").logits
        results[backend] = (prepared, reference, sqnr(reference, logits))
    pt2e, reference, pt2e_db = results["pt2e"]
    count = sum(x.shape[0] for x in inputs)
    if "fx" in results:
        fx, _, fx_db = results["fx"]
        a, b = weight_scales(fx.model), weight_scales(pt2e.model)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{name} ({count} inputs): FX {fx_db:.2f} dB ({len(fx.quantizers)} quantizers), "
              f"PT2E {pt2e_db:.2f} dB ({len(pt2e.quantizers)}), PT2E - FX {pt2e_db - fx_db:+.2f} dB; "
              f"{len(a)} weight scales identical: {same}")
    else:
        print(f"{name} ({count} inputs): PT2E {pt2e_db:.2f} dB ({len(pt2e.quantizers)} quantizers)")
    stream = stream_quantizers(pt2e)
    if not stream:
        return
    for quantizer in stream:
        pt2e.model.get_submodule(quantizer).disable_fake_quant()
    off = sqnr(reference, collect_logits(pt2e.model, inputs, "cpu").logits)
    for quantizer in stream:
        pt2e.model.get_submodule(quantizer).enable_fake_quant()
    print(f"  PT2E with its {len(stream)} residual-stream (add output) quantizers off: {off:.2f} dB")
    x = torch.cat(inputs)
    ends = [stream[0], stream[-1]]
    quantized = quantizer_inputs(pt2e.model, ends, x, fake_quant=True)
    exact = quantizer_inputs(pt2e.model, ends, x, fake_quant=False)
    for quantizer in ends:
        clean, noisy = exact[quantizer], quantized[quantizer]
        if clean.dim() != 3 or clean.shape[1] < 2:
            continue
        rounded = pt2e.model.get_submodule(quantizer)(clean.clone())
        rows = {"row 0": (slice(None), 0), "rows 1+": (slice(None), slice(1, None))}
        parts = []
        for label, index in rows.items():
            parts.append(
                f"{label}: std {clean[index].std().item():.3f}, own rounding {sqnr(clean[index], rounded[index]):.1f} dB, "
                f"accumulated {sqnr(clean[index], noisy[index]):.1f} dB"
            )
        print(f"  {quantizer}: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["timm:vit_tiny_patch16_224", "resnet18"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, w8a8, seeded init (seed 0)")
    for name in args.models:
        compare(name)


if __name__ == "__main__":
    main()
