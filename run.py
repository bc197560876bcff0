"""Hydra entry point in a checkout: compose the config, run one cell, nothing else.

python run.py method=cpl protocol=p2 seed=2026
python run.py -m method=cal,cpl seed=2025,2026,2027
python run.py +sweep=demo

The same application as `owdfa-bench train` (owdfa_bench/train.py), which an installed package
runs from any folder.
"""

from owdfa_bench.train import main

if __name__ == "__main__":
    main()
