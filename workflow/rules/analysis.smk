# Prediction diversity and ensembles of the methods (Mai et al., CVPR 2025):
# members are chosen on the chosen tuning cells' validation predictions only,
# then scored on the final runs seed by seed. With fewer than two methods the
# command writes only a short note (see ensemble_files()).
rule analyse_ensembles:
    input:
        tables=expand(f"{RES}/tables/{{dataset}}.parquet", dataset=DATASETS),
        selections=expand(
            f"{RES}/selection/{{dataset}}/{{method}}.json",
            dataset=DATASETS,
            method=METHODS,
        ),
    output:
        ensemble_files(),
    log:
        f"{LOGS}/analyse_ensembles.log",
    conda:
        ENV
    params:
        study=STUDY.name,
        # RES: the tables sit in RES/tables/
        results=lambda wc, input: Path(input.tables[0]).parent.parent,
        out_dir=lambda wc, output: Path(output[0]).parent,
    shell:
        "python -m peft_core.cli ensembles --study {params.study:q} --results {params.results:q} "
        "--tables {input.tables:q} --selections {input.selections:q} --out-dir {params.out_dir:q} "
        "> {log:q} 2>&1"
