# Selection sees only tuning cells (evaluated on the validation split); the
# command refuses any cell evaluated elsewhere.
rule select_config:
    input:
        lambda wc: pack_manifests(wc.dataset, wc.method),
    output:
        f"{RES}/selection/{{dataset}}/{{method}}.json",
    log:
        f"{LOGS}/select_config/{{dataset}}/{{method}}.log",
    conda:
        ENV
    params:
        cells=lambda wc: tuning_dirs(wc.dataset, wc.method),
        split=CFG.data.tune_eval,
    shell:
        "python -m peft_core.cli select --cells {params.cells:q} --eval-split {params.split:q} --out {output:q} > {log:q} 2>&1"
