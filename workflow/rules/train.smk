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
        "python -m peft_core.cli code-stamp --files {input:q} --out {output:q} > {log:q} 2>&1"


# Data-dependent steps before training (SCT, GPS, NOAH; peft_core/prestep.py): one
# result per (data set, split, backbone, the settings it depends on), read from the
# training split only (a search also from the validation split, never from test).
# The cells that use one record its sha256, so a changed result retrains them.
rule run_prestep:
    input:
        unpack(prestep_inputs),
    output:
        result=f"{RES}/prestep/{{dataset}}/{{method}}/{{key}}.safetensors",
        summary=f"{RES}/prestep/{{dataset}}/{{method}}/{{key}}.json",
    log:
        f"{LOGS}/prestep/{{dataset}}/{{method}}/{{key}}.log",
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=CFG.compute.train.runtime,
    params:
        spec=lambda wc: prestep_of(wc).canonical_json(),
        eval=optional_args("--eval-data", "eval"),
        device=CFG.compute.train.device,
    shell:
        "python -m peft_core.cli prestep --spec-json {params.spec:q} --train-data {input.train:q} {params.eval:q} "
        "--checkpoint {input.checkpoint:q} --out {output.result:q} --threads {threads} --device {params.device:q} "
        "> {log:q} 2>&1"


# Cached frozen features (peft_core/features.py): the classification head's input
# for every image of one split, computed once and read by the head-only methods'
# cells (the linear probe) instead of the images, with the same result. Named by
# what the plan knows; the file holds its content key (the split's pixels and
# labels, the checkpoint's bytes, this code), which each cell checks.
rule extract_features:
    input:
        data=lambda wc: cache_path(wc.dataset, wc.split),
        checkpoint=CFG.backbone.checkpoint,
        code=FEATURE_CODE,
    output:
        f"{RES}/features/{{dataset}}/{{split}}_{{key}}.safetensors",
    log:
        f"{LOGS}/extract_features/{{dataset}}/{{split}}_{{key}}.log",
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=CFG.compute.train.runtime,
    params:
        spec=lambda wc: feature_of(wc).canonical_json(),
        device=CFG.compute.train.device,
    shell:
        "python -m peft_core.cli features --spec-json {params.spec:q} --data {input.data:q} "
        "--checkpoint {input.checkpoint:q} --out {output:q} --threads {threads} --device {params.device:q} "
        "> {log:q} 2>&1"


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
        prestep=optional_args("--prestep", "prestep"),
        features=optional_args("--features", "features"),
        batched=["--batched"] if CFG.compute.train.batched_packs else [],
    shell:
        "python -m peft_core.cli train-pack --spec-json {params.specs:q} --train-data {input.train:q} "
        "--eval-data {input.eval:q} --checkpoint {input.checkpoint:q} --code-stamp {input.code:q} "
        "--cells-root {params.cells:q} --manifest {output:q} --threads {threads} --device {params.device:q} "
        "{params.prestep:q} {params.features:q} {params.batched:q} > {log:q} 2>&1"


# Final runs: one job per (dataset, method) trains the chosen configuration
# once per seed (a pack of final cells, reusing any done with the same spec and
# code). It reads the choice from the selection file at run time, so the DAG is
# known in full before anything runs: no checkpoint, no re-planning mid-run
# (which also breaks Snakemake's group-components on a cluster).
rule train_final:
    input:
        unpack(final_inputs),
    output:
        f"{RES}/finals/{{dataset}}/{{method}}.json",
    log:
        f"{LOGS}/train_final/{{dataset}}/{{method}}.log",
    # Not "train": a group mixing packs and final runs can wait on itself through
    # selection (group A's final needs group B's pack and vice versa) and never start.
    group:
        "final"
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=CFG.compute.train.runtime * len(CFG.train.final_seeds),
    params:
        seeds=CFG.train.final_seeds,
        final_train=CFG.data.final_train,
        final_eval=CFG.data.final_eval,
        cells=f"{RES}/cells",
        device=CFG.compute.train.device,
        prestep=optional_args("--prestep", "prestep"),
        features=optional_args("--features", "features"),
        batched=["--batched"] if CFG.compute.train.batched_packs else [],
    shell:
        "python -m peft_core.cli train-pack --selection {input.selection:q} --final-seeds {params.seeds:q} "
        "--final-train {params.final_train:q} --final-eval {params.final_eval:q} --train-data {input.train:q} "
        "--eval-data {input.eval:q} --checkpoint {input.checkpoint:q} --code-stamp {input.code:q} "
        "--cells-root {params.cells:q} --manifest {output:q} --threads {threads} --device {params.device:q} "
        "{params.prestep:q} {params.features:q} {params.batched:q} > {log:q} 2>&1"


# Successive halving (tuning.strategy: halving; peft_core/halving.py). Rung 0: each
# pack's cells trained up to the first budget (the schedule stays the full budget's;
# the state is saved in the cell for the next rung). Same cells, same ids as the grid.
rule train_rung:
    input:
        unpack(train_inputs),
    output:
        f"{RES}/rungs/{{dataset}}/{{method}}/r0/{{pack}}.json",
    log:
        f"{LOGS}/train_rung/{{dataset}}/{{method}}/r0/{{pack}}.log",
    group:
        "train"
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=lambda wc: rung_runtime(
            RUNGS[(wc.dataset, wc.method)][0], len(pack_specs(wc))
        ),
    params:
        specs=lambda wc: [spec.canonical_json() for spec in pack_specs(wc)],
        budget=lambda wc: RUNGS[(wc.dataset, wc.method)][0].epochs,
        cells=f"{RES}/cells",
        device=CFG.compute.train.device,
        prestep=optional_args("--prestep", "prestep"),
        features=optional_args("--features", "features"),
    shell:
        "python -m peft_core.cli train-pack --spec-json {params.specs:q} --budget {params.budget} "
        "--train-data {input.train:q} --eval-data {input.eval:q} --checkpoint {input.checkpoint:q} "
        "--code-stamp {input.code:q} --cells-root {params.cells:q} --manifest {output:q} --threads {threads} "
        "--device {params.device:q} {params.prestep:q} {params.features:q} > {log:q} 2>&1"


# A later rung: one job per chunk of the previous rung's ranked slots (a pack's size)
# reads that ranking at run time and trains the configurations it promotes, each
# resuming from its saved state up to this rung's budget (the full one: the grid's cell).
# Not in group "train": it waits on a ranking that waits on the packs.
rule train_promoted:
    input:
        unpack(promoted_inputs),
    output:
        f"{RES}/rungs/{{dataset}}/{{method}}/r{{rung}}/c{{chunk}}.json",
    log:
        f"{LOGS}/train_promoted/{{dataset}}/{{method}}/r{{rung}}/c{{chunk}}.log",
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=lambda wc: rung_runtime(rung_of(wc), rung_of(wc).chunk),
    params:
        slots=promoted_slots,
        budget=lambda wc: rung_of(wc).epochs,
        cells=f"{RES}/cells",
        device=CFG.compute.train.device,
        prestep=optional_args("--prestep", "prestep"),
        features=optional_args("--features", "features"),
    shell:
        "python -m peft_core.cli train-pack --ranking {input.ranking:q} --slots {params.slots} "
        "--budget {params.budget} --train-data {input.train:q} --eval-data {input.eval:q} "
        "--checkpoint {input.checkpoint:q} --code-stamp {input.code:q} --cells-root {params.cells:q} "
        "--manifest {output:q} --threads {threads} --device {params.device:q} {params.prestep:q} "
        "{params.features:q} > {log:q} 2>&1"
