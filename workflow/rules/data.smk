SPLITS = [
    CFG.data.tune_train,
    CFG.data.tune_eval,
    CFG.data.final_train,
    CFG.data.final_eval,
]

if CFG.data.generator == "demo":

    rule make_demo_data:
        output:
            splits=expand(
                f"{CFG.data.root}/{{{{dataset}}}}/{{split}}.txt", split=SPLITS
            ),
        log:
            f"{LOGS}/make_demo_data/{{dataset}}.log",
        # writes a few hundred small images: runs on the submit host
        localrule: True
        conda:
            ENV
        params:
            root=lambda wc, output: Path(output.splits[0]).parent.parent,
        shell:
            "python -m peft_core.cli make-demo-data --root {params.root} --dataset {wildcards.dataset} > {log} 2>&1"


if CFG.backbone.pretrain is not None:

    rule pretrain_demo_backbone:
        output:
            CFG.backbone.checkpoint,
        log:
            f"{LOGS}/pretrain_demo_backbone.log",
        conda:
            ENV
        threads: 2
        params:
            backbone=json.dumps(CFG.backbone.model_dump(mode="json"), sort_keys=True),
        shell:
            "python -m peft_core.cli pretrain-demo --backbone-json {params.backbone:q} --out {output} "
            "--threads {threads} > {log} 2>&1"


rule cache_split:
    input:
        f"{CFG.data.root}/{{dataset}}/{{split}}.txt",
    output:
        f"{RES}/cache/{{dataset}}/{{split}}_{CFG.data.image_size}px.pt",
    log:
        f"{LOGS}/cache_split/{{dataset}}/{{split}}.log",
    wildcard_constraints:
        dataset=one_of(DEFAULT_LAYOUT),
    conda:
        ENV
    params:
        root=lambda wc, input: Path(input[0]).parent.parent,
        size=CFG.data.image_size,
        num_classes=lambda wc: CFG.datasets[wc.dataset].num_classes,
    shell:
        "python -m peft_core.cli cache --root {params.root} --dataset {wildcards.dataset} --split {wildcards.split} "
        "--size {params.size} --num-classes {params.num_classes} --out {output} > {log} 2>&1"


if OTHER_LAYOUT:

    rule cache_split_layout:
        input:
            lambda wc: split_listing(
                f"{STUDY.data_location(wc.dataset)[0]}/{wc.dataset}",
                wc.split,
                STUDY.data_location(wc.dataset)[1],
            ),
        output:
            f"{RES}/cache/{{dataset}}/{{split}}_{CFG.data.image_size}px.pt",
        log:
            f"{LOGS}/cache_split/{{dataset}}/{{split}}.log",
        wildcard_constraints:
            dataset=one_of(OTHER_LAYOUT),
        conda:
            ENV
        params:
            root=lambda wc: STUDY.data_location(wc.dataset)[0],
            layout=lambda wc: STUDY.data_location(wc.dataset)[1],
            size=CFG.data.image_size,
            num_classes=lambda wc: CFG.datasets[wc.dataset].num_classes,
        shell:
            "python -m peft_core.cli cache --root {params.root} --dataset {wildcards.dataset} --split {wildcards.split} "
            "--layout {params.layout} --size {params.size} --num-classes {params.num_classes} --out {output} > {log} 2>&1"
