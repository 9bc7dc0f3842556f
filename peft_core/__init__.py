"""peft_core: the small core package behind peft-vision-bench.

Each training cell of a study is one call of :func:`peft_core.train.run_cell`;
the Snakemake workflow under ``workflow/`` schedules the cells and the
report builder turns their ``metrics.json`` rows into tables.
"""

__version__ = "0.1.0"
