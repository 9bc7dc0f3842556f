# Robustness under distribution shift (WiSE-FT): every final run of a data
# set that declares shifted test sets (`datasets.<d>.ood`) is interpolated
# with the pre-trained backbone along `robustness.alphas` (mergeable methods;
# the others: alpha = 1 only) and scored on the ID test split and each
# shifted set. See peft_core/robustness.py; helpers in shifts.smk.


if DEMO_SHIFTS:

    rule make_demo_shift:
        output:
            "{shift_root}/{shift_split}.txt",
        log:
            f"{LOGS}/make_demo_shift/{{shift_root}}/{{shift_split}}.log",
        wildcard_constraints:
            shift_root=one_of(DEMO_SHIFTS),
            shift_split=one_of({s for _, s in DEMO_SHIFTS.values()}),
        localrule: True
        conda:
            ENV
        params:
            dataset=lambda wc: DEMO_SHIFTS[wc.shift_root][0],
        shell:
            "python -m peft_core.cli make-demo-shift --root {wildcards.shift_root:q} --dataset {params.dataset:q} "
            "--split {wildcards.shift_split:q} > {log:q} 2>&1"


rule cache_ood:
    input:
        lambda wc: ood_listing(wc.dataset, wc.ood),
    output:
        cache=f"{RES}/cache/{{dataset}}/ood/{{ood}}_{CFG.data.image_size}px_{CFG.data.interpolation}.safetensors",
        source=f"{RES}/cache/{{dataset}}/ood/{{ood}}_{CFG.data.image_size}px_{CFG.data.interpolation}.safetensors.source.json",
    log:
        f"{LOGS}/cache_ood/{{dataset}}/{{ood}}.log",
    wildcard_constraints:
        ood=one_of(OOD_NAMES),
    # a bad shifted set (missing or corrupt image, label out of range) fails before training
    priority: 1
    conda:
        ENV
    params:
        parent=lambda wc: Path(STUDY.ood_sets(wc.dataset)[wc.ood].root).parent,
        folder=lambda wc: Path(STUDY.ood_sets(wc.dataset)[wc.ood].root).name,
        split=lambda wc: STUDY.ood_sets(wc.dataset)[wc.ood].split,
        layout=lambda wc: STUDY.ood_sets(wc.dataset)[wc.ood].layout or "vtab",
        size=CFG.data.image_size,
        interpolation=CFG.data.interpolation,
        num_classes=lambda wc: STUDY.ood_num_classes(wc.dataset, wc.ood),
    shell:
        "python -m peft_core.cli cache --root {params.parent:q} --dataset {params.folder:q} --split {params.split:q} "
        "--layout {params.layout:q} --size {params.size:q} --interpolation {params.interpolation:q} --num-classes {params.num_classes:q} --out {output.cache:q} "
        "> {log:q} 2>&1"


rule robustness:
    input:
        table=f"{RES}/tables/{{dataset}}.parquet",
        selections=expand(
            f"{RES}/selection/{{{{dataset}}}}/{{method}}.json", method=METHODS
        ),
        caches=lambda wc: list(eval_caches(wc.dataset).values()),
        checkpoint=CFG.backbone.checkpoint,
    output:
        f"{RES}/robustness/{{dataset}}.parquet",
    log:
        f"{LOGS}/robustness/{{dataset}}.log",
    wildcard_constraints:
        dataset=one_of(OOD_DATASETS),
    conda:
        ENV
    threads: CFG.compute.train.threads
    resources:
        gpu=CFG.compute.train.gpu,
        mem_mb=CFG.compute.train.mem_mb,
        runtime=CFG.compute.train.runtime,
    params:
        plan=lambda wc: plan_json(STUDY, wc.dataset),
        evals=lambda wc: [f"{n}={p}" for n, p in eval_caches(wc.dataset).items()],
        # RES: the tables sit in RES/tables/
        results=lambda wc, input: Path(input.table).parent.parent,
        device=CFG.compute.train.device,
    shell:
        "python -m peft_core.cli robustness --tables {input.table:q} --selections {input.selections:q} "
        "--results {params.results:q} --plan {params.plan:q} --eval {params.evals:q} "
        "--checkpoint {input.checkpoint:q} --threads {threads} --device {params.device:q} --out {output:q} > {log:q} 2>&1"


rule robustness_report:
    input:
        expand(f"{RES}/robustness/{{dataset}}.parquet", dataset=OOD_DATASETS),
    output:
        md=report(
            f"{REPORT}/robustness.md",
            category="Robustness",
            labels={"table": "markdown"},
        ),
        html=report(
            f"{REPORT}/robustness.html",
            category="Robustness",
            labels={"table": "html"},
        ),
        parquet=f"{REPORT}/robustness.parquet",
        figures=robustness_figures(),
    log:
        f"{LOGS}/robustness_report.log",
    conda:
        ENV
    params:
        study=STUDY.name,
        out_dir=lambda wc, output: Path(output.md).parent,
    shell:
        "python -m peft_core.cli robustness-report --study {params.study:q} --tables {input:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
