"""Hydra entry point: compose the config, run one cell, nothing else.

python run.py method=cpl protocol=p2 seed=2026
python run.py -m method=cal,cpl seed=2025,2026,2027
python run.py +sweep=demo
"""

import hydra
from omegaconf import DictConfig

from owdfa_bench.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    record = run(cfg)
    return record.get("metrics", {}).get("all_acc")


if __name__ == "__main__":
    main()
