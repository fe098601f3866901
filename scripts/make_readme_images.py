"""Draw the README's example plots: an activation SA plot and a weight SA plot.

resnet18 (torchvision, seeded init) is prepared with the seeds' w8a8 recipe, calibrated on the
built-in photos, and one photo (scikit-image's tabby cat, or matplotlib's Grace Hopper without
scikit-image) goes forward and ``output.mean()`` backward, as in the SA tutorial. The images:

- docs/images/act-sa-example.png: the last activation quantizer fed by a ReLU module
  (layer4.0.relu): a zero bin holding much of the mass, and a clamped tail;
- docs/images/weight-sa-example.png: the weight of layer4.0.conv2 (the tutorial's example).

Usage: python scripts/make_readme_images.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()

    import torchvision

    from eqcore.models.samples import find_sample, samples_loader
    from eqcore.models.specs import eval_transform, imagenet_spec
    from eqcore.analysis.sa_run import run_sensitivity_analysis
    from eqcore.plots.png import save_figure
    from eqcore.plots.render import render_sa_hist
    from eqcore.prepare.calibrate import calibrate
    from eqcore.prepare.quantize import prepare_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = imagenet_spec()
    model = prepare_model(torchvision.models.resnet18(), "w8a8", (torch.randn(1, 3, 224, 224),))
    calibrate(model, samples_loader(spec, split="calib", batch_size=8, n_augmented=16))
    try:
        sample = find_sample("chelsea")
    except Exception:
        sample = find_sample("grace_hopper")
    image = eval_transform(spec)(sample.load()).unsqueeze(0)
    result = run_sensitivity_analysis(model, [image])

    after_relu = [sa for sa in result.activations.values()
                  if sa.producer and sa.producer.endswith("relu")]
    activation = after_relu[-1] if after_relu else list(result.activations.values())[-1]
    weight = result.weights["layer4.0.conv2"]
    args.out.mkdir(parents=True, exist_ok=True)
    act_path = save_figure(
        render_sa_hist(activation, title=f"Sensitivity analysis - {sample.name} - "
                       f"{activation.name} (after {activation.producer})"),
        args.out / "act-sa-example.png",
    )
    weight_path = save_figure(
        render_sa_hist(weight, tensor_kind="Weight",
                       title=f"Sensitivity analysis - {sample.name} - layer4.0.conv2 weight"),
        args.out / "weight-sa-example.png",
    )
    for path in (act_path, weight_path):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


if __name__ == "__main__":
    main()
