rule aggregate_dataset:
    input:
        unpack(dataset_inputs),
    output:
        f"{RES}/tables/{{dataset}}.parquet",
    log:
        f"{LOGS}/aggregate_dataset/{{dataset}}.log",
    conda:
        ENV
    params:
        cells=aggregate_cells,
        group=lambda wc: CFG.datasets[wc.dataset].group,
        study=STUDY.name,
        final_eval=CFG.data.final_eval,
    shell:
        "python -m peft_core.cli aggregate --study {params.study:q} --group {params.group:q} "
        "--final-eval {params.final_eval:q} {params.cells:q} --finals {input.finals:q} "
        "--selections {input.selections:q} "
        "--out {output:q} > {log:q} 2>&1"


rule build_report:
    input:
        expand(f"{RES}/tables/{{dataset}}.parquet", dataset=DATASETS),
    output:
        md=report(
            f"{REPORT}/summary.md", category="Summary", labels={"table": "markdown"}
        ),
        csv=report(f"{REPORT}/summary.csv", category="Summary", labels={"table": "csv"}),
        parquet=f"{REPORT}/results.parquet",
        html=report(
            f"{REPORT}/index.html", category="Summary", labels={"table": "html"}
        ),
        # figures/*.{pdf,svg,png}, tables/*.tex, stats/*.csv (peft_core/paper.py)
        paper=paper_files(),
    log:
        f"{LOGS}/build_report.log",
    conda:
        ENV
    params:
        config=json.dumps(config),
        out_dir=lambda wc, output: Path(output.md).parent,
        # RES: the final runs' predictions (confidence intervals) and the results history
        results=lambda wc, input: Path(input[0]).parent.parent,
    shell:
        "python -m peft_core.cli report --config {params.config:q} --tables {input:q} --out-dir {params.out_dir:q} "
        "--results {params.results:q} > {log:q} 2>&1"
