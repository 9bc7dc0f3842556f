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
            "python -m peft_core.cli make-demo-data --root {params.root:q} --dataset {wildcards.dataset:q} > {log:q} 2>&1"


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
            "python -m peft_core.cli pretrain-demo --backbone-json {params.backbone:q} --out {output:q} "
            "--threads {threads} > {log:q} 2>&1"


# Each split is decoded once; validation and test are checked against the splits
# they must not share an image with (by path and by content), before any training.
rule cache_split:
    input:
        listing=f"{CFG.data.root}/{{dataset}}/{{split}}.txt",
        others=lambda wc: [
            f"{CFG.data.root}/{wc.dataset}/{s}.txt" for s in disjoint_splits(wc.split)
        ],
    output:
        cache=f"{RES}/cache/{{dataset}}/{{split}}_{CFG.data.image_size}px_{CFG.data.interpolation}.safetensors",
        source=f"{RES}/cache/{{dataset}}/{{split}}_{CFG.data.image_size}px_{CFG.data.interpolation}.safetensors.source.json",
    log:
        f"{LOGS}/cache_split/{{dataset}}/{{split}}.log",
    wildcard_constraints:
        dataset=one_of(DEFAULT_LAYOUT),
    conda:
        ENV
    resources:
        mem_mb=lambda wc, input: cache_mem_mb(input.listing, "vtab"),
    params:
        root=lambda wc, input: Path(input.listing).parent.parent,
        size=CFG.data.image_size,
        interpolation=CFG.data.interpolation,
        num_classes=lambda wc: CFG.datasets[wc.dataset].num_classes,
        disjoint=lambda wc: [
            a for s in disjoint_splits(wc.split) for a in ("--disjoint-from", s)
        ],
    shell:
        "python -m peft_core.cli cache --root {params.root:q} --dataset {wildcards.dataset:q} --split {wildcards.split:q} "
        "--size {params.size:q} --interpolation {params.interpolation:q} --num-classes {params.num_classes:q} "
        "{params.disjoint:q} --out {output.cache:q} > {log:q} 2>&1"


if OTHER_LAYOUT:

    rule cache_split_layout:
        input:
            listing=lambda wc: layout_listing(wc.dataset, wc.split),
            others=lambda wc: [
                layout_listing(wc.dataset, s) for s in disjoint_splits(wc.split)
            ],
        output:
            cache=f"{RES}/cache/{{dataset}}/{{split}}_{CFG.data.image_size}px_{CFG.data.interpolation}.safetensors",
            source=f"{RES}/cache/{{dataset}}/{{split}}_{CFG.data.image_size}px_{CFG.data.interpolation}.safetensors.source.json",
        log:
            f"{LOGS}/cache_split/{{dataset}}/{{split}}.log",
        wildcard_constraints:
            dataset=one_of(OTHER_LAYOUT),
        conda:
            ENV
        resources:
            mem_mb=lambda wc, input: cache_mem_mb(
                input.listing, STUDY.data_location(wc.dataset)[1]
            ),
        params:
            root=lambda wc: STUDY.data_location(wc.dataset)[0],
            layout=lambda wc: STUDY.data_location(wc.dataset)[1],
            size=CFG.data.image_size,
            interpolation=CFG.data.interpolation,
            num_classes=lambda wc: CFG.datasets[wc.dataset].num_classes,
            disjoint=lambda wc: [
                a for s in disjoint_splits(wc.split) for a in ("--disjoint-from", s)
            ],
        shell:
            "python -m peft_core.cli cache --root {params.root:q} --dataset {wildcards.dataset:q} --split {wildcards.split:q} "
            "--layout {params.layout:q} --size {params.size:q} --interpolation {params.interpolation:q} "
            "--num-classes {params.num_classes:q} {params.disjoint:q} --out {output.cache:q} > {log:q} 2>&1"
