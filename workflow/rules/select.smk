# Selection sees only tuning cells (evaluated on the validation split); the
# command refuses any cell evaluated elsewhere.
rule select_config:
    input:
        lambda wc: tuning_outputs(wc.dataset, wc.method),
    output:
        f"{RES}/selection/{{dataset}}/{{method}}.json",
    log:
        f"{LOGS}/select_config/{{dataset}}/{{method}}.log",
    conda:
        ENV
    params:
        cells=selection_args,
        split=CFG.data.tune_eval,
    shell:
        "python -m peft_core.cli select {params.cells:q} --eval-split {params.split:q} --out {output:q} > {log:q} 2>&1"


# Successive halving (peft_core/halving.py): one rung's cells ranked by validation
# accuracy (ties: cell id); the next rung's jobs read the top `promote` from it
# (noise-aware: also those within tuning.keep_within_se standard errors of the best).
rule rank_rung:
    input:
        unpack(rank_inputs),
    output:
        f"{RES}/rungs/{{dataset}}/{{method}}/r{{rung}}.json",
    log:
        f"{LOGS}/rank_rung/{{dataset}}/{{method}}/r{{rung}}.log",
    conda:
        ENV
    params:
        split=CFG.data.tune_eval,
        previous=lambda wc: rung_of(wc).previous,
        promote=lambda wc: rung_of(wc).promote,
        noise=noise_args,
    shell:
        "python -m peft_core.cli rank-rung --manifests {input.manifests:q} --eval-split {params.split:q} "
        "--rung {wildcards.rung} --previous {params.previous} --promote {params.promote} {params.noise:q} "
        "--out {output:q} > {log:q} 2>&1"
