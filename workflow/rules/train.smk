# The code a method's cells run, as one checksum file per method: editing
# peft_core/methods/lora.py (or a helper it imports) reruns LoRA cells only;
# editing the engine (train.py, backbones.py, data.py) reruns every cell.
# One small input per cell instead of ~10 keeps planning fast for 10^4 cells.
rule stamp_code:
    input:
        lambda wc: METHOD_CODE[wc.method] + ENGINE_CODE,
    output:
        f"{RES}/code/{{method}}.sha256",
    log:
        f"{LOGS}/stamp_code/{{method}}.log",
    localrule: True
    conda:
        ENV
    shell:
        "python -m peft_core.cli code-stamp --files {input} --out {output} > {log} 2>&1"


# Tuning: one job per method configuration trains its lr x weight-decay cells
# one after another, reusing any cell already done with the same spec and code
# (peft_core/packs.py); its manifest, written last, is what selection waits for.
rule train_pack:
    input:
        unpack(train_inputs),
    output:
        f"{RES}/packs/{{dataset}}/{{method}}/{{pack}}.json",
    log:
        f"{LOGS}/train_pack/{{dataset}}/{{method}}/{{pack}}.log",
    group:
        "train"
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=lambda wc: CFG.compute.train.runtime * len(pack_specs(wc)),
    params:
        specs=lambda wc: [spec.canonical_json() for spec in pack_specs(wc)],
        cells=f"{RES}/cells",
        device=CFG.compute.train.device,
    shell:
        "python -m peft_core.cli train-pack --spec-json {params.specs:q} --train-data {input.train} "
        "--eval-data {input.eval} --checkpoint {input.checkpoint} --code-stamp {input.code} "
        "--cells-root {params.cells} --manifest {output} --threads {threads} --device {params.device} "
        "> {log} 2>&1"


# Final runs: one job per (chosen configuration, seed), known after selection.
rule train_cell:
    input:
        unpack(train_inputs),
    output:
        metrics=f"{RES}/cells/{{dataset}}/{{method}}/{{cell}}/metrics.json",
        predictions=f"{RES}/cells/{{dataset}}/{{method}}/{{cell}}/predictions.parquet",
        spec=f"{RES}/cells/{{dataset}}/{{method}}/{{cell}}/spec.json",
        weights=f"{RES}/cells/{{dataset}}/{{method}}/{{cell}}/trainable.safetensors",
    log:
        f"{LOGS}/train_cell/{{dataset}}/{{method}}/{{cell}}.log",
    group:
        "train"
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=CFG.compute.train.runtime,
    params:
        spec=lambda wc: spec_for(wc).canonical_json(),
        dir=subpath(output.metrics, parent=True),
        device=CFG.compute.train.device,
    shell:
        "python -m peft_core.cli train --spec-json {params.spec:q} --train-data {input.train} "
        "--eval-data {input.eval} --checkpoint {input.checkpoint} --code-stamp {input.code} "
        "--out {params.dir} --threads {threads} --device {params.device} > {log} 2>&1"
