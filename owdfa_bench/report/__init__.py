"""The report of a sweep: its `results.json` files -> the tables, figures and W&B run people
publish.

The stages import one way, each only from the ones before it:

- `naming`: how cells are named, ordered (`display` of `conf/method/*.yaml`) and marked;
- `collect`: every `results.json` -> one pandas row per run;
- `validate`: why a run is left out, and every issue of the sweep;
- `summarise`: mean, std, n (and t-intervals, Welch tests, diagnostics) per cell, by groupby;
- `paper`: the published numbers of `results/paper/` beside ours;
- `render`: Markdown (`to_markdown`) and LaTeX (`Styler.to_latex`) tables;
- `plots`: the PNG/PDF figures;
- `tracking`: the W&B aggregate run;
- `main`: `write_tables`, `write_report`, the `owdfa-bench aggregate` command and the Hydra
  end-of-multirun callback.

Importing this package imports none of them, so `owdfa-bench --help` stays fast.
"""
