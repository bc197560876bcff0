"""How far the synthetic benchmark's pretrained start separates its forgery classes, untrained.

The papers start from ImageNet weights whose features separate forgery types somewhat before
any open-world training. This script measures the same property of the synthetic start
(`data.pretrain`, owdfa_bench/pretrain.py) against a random initialisation: the backbone's
pooled features of the P1 test split (no training on the benchmark), clustered with k-means
(owdfa_bench/kmeans.py), scored with the harness metrics: All ACC and NMI with K = 41 over all
test rows, Novel ACC with K = 22 over the novel-class rows only. The labels score the
clustering only. Synthetic data: the numbers say nothing about real deepfakes.

    python benchmarks/pretrained_start.py [overrides, e.g. data.backbone.name=resnet18]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from omegaconf import OmegaConf

from owdfa_bench.config import compose_config
from owdfa_bench.data.datamodule import build_splits
from owdfa_bench.data.datasets import EvalRows
from owdfa_bench.data.transforms import build_view
from owdfa_bench.kmeans import semi_supervised_kmeans
from owdfa_bench.metrics import cluster_acc, evaluate_predictions
from owdfa_bench.models import build_backbone
from owdfa_bench.pretrain import resolve_pretrained_start


@torch.no_grad()
def test_features(backbone: torch.nn.Module, rows, image_size: int) -> np.ndarray:
    loader = torch.utils.data.DataLoader(
        EvalRows(rows, build_view("test", image_size)), batch_size=256, shuffle=False
    )
    backbone.eval()
    feats = [backbone(b["image"]).mean(dim=(2, 3)) for b in loader]
    return torch.nn.functional.normalize(torch.cat(feats), dim=1).numpy()


def kmeans_ids(features: np.ndarray, k: int) -> np.ndarray:
    no_labels = torch.full((len(features),), -1)
    result = semi_supervised_kmeans(torch.from_numpy(features), no_labels, k, n_init=10, seed=0)
    return np.asarray(result.assignments)


def scores(features: np.ndarray, y: np.ndarray, num_known: int, num_classes: int) -> dict:
    all_ids = kmeans_ids(features, num_classes)
    novel = y >= num_known
    novel_ids = kmeans_ids(features[novel], num_classes - num_known)
    metrics = evaluate_predictions(y, all_ids, num_known)["metrics"]
    return {
        "all_acc": metrics["all_acc"],
        "all_nmi": metrics["all_nmi"],
        "novel_acc": cluster_acc(y[novel], novel_ids),
    }


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    cfg = compose_config(["method=lower_bound", *argv])
    splits = build_splits(cfg.data, cfg.protocol)
    y = np.array([label for _, label in splits.test])
    backbone_cfg = OmegaConf.to_container(cfg.data.backbone, resolve=True)
    start = resolve_pretrained_start(cfg.data)
    print(
        f"P1 test split: {len(y)} rows, {splits.num_classes} classes ({splits.num_known} known); "
        f"backbone {backbone_cfg['name']} at {cfg.data.image_size} px; synthetic data"
    )
    print("| start | k-means All ACC | All NMI | Novel ACC (k-means on novel rows) |")
    print("|---|---:|---:|---:|")
    for name, weights in (("random init", None), ("pretrained start", start["weights"])):
        torch.manual_seed(0)
        backbone = build_backbone(backbone_cfg["name"], weights=weights)
        got = scores(
            test_features(backbone, splits.test, cfg.data.image_size),
            y,
            splits.num_known,
            splits.num_classes,
        )
        print(
            f"| {name} | {100 * got['all_acc']:.1f} | {100 * got['all_nmi']:.1f} "
            f"| {100 * got['novel_acc']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
