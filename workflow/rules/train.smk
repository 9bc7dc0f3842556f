rule train_cell:
    input:
        unpack(train_inputs),
    output:
        metrics=f"{RES}/cells/{{dataset}}/{{method}}/{{cell}}/metrics.json",
        predictions=f"{RES}/cells/{{dataset}}/{{method}}/{{cell}}/predictions.parquet",
        spec=f"{RES}/cells/{{dataset}}/{{method}}/{{cell}}/spec.json",
    log:
        f"{LOGS}/train_cell/{{dataset}}/{{method}}/{{cell}}.log",
    params:
        spec=lambda wc: spec_for(wc).canonical_json(),
        dir=subpath(output.metrics, parent=True),
        device=CFG.compute.train.device,
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=CFG.compute.train.runtime,
    group:
        "train"
    shell:
        "peft-core train --spec-json {params.spec:q} --train-data {input.train} "
        "--eval-data {input.eval} --checkpoint {input.checkpoint} --out {params.dir} "
        "--threads {threads} --device {params.device} > {log} 2>&1"
