"""Group-level Nipype workflow (wiring only).

    group_summary                      QC table and group-mean graphs
    train_<model>_<direction>  -> publish_train_<...>      model files, metrics, interpretation
                               -> apply_<model>_<direction> -> publish_apply_<...>
                                                            predictions for every subject's runs
    benchmark -> publish_benchmark      (--benchmark) every entry on one split: Table-I-style
                                        group/desc-benchmark_metrics.{tsv,md,svg}

Training and inference are GPU nodes (``use_gpu``) when they run on CUDA: MultiProc runs at most
``--n-gpu-procs`` of them at once, beside the CPU nodes.
"""

from __future__ import annotations

import dataclasses

from nipype.pipeline import engine as pe

from samba_pipeline.config import Settings
from samba_pipeline.interfaces.group import GroupSummary
from samba_pipeline.interfaces.models import ApplyModel, Benchmark, PublishStage, TrainModel
from samba_pipeline.workflows.participant import workflow_name


def init_group_wf(settings: Settings, *, inputs_digest: str, use_gpu: bool = False,
                  train_mem_gb: float = 2.0) -> pe.Workflow:
    """Summarise the participants' derivatives, then train, evaluate and apply each model."""
    out = str(settings.output_dir)
    wf = pe.Workflow(name=workflow_name().replace("_wf", "_group_wf"), base_dir=str(settings.work_dir))
    summary = pe.Node(GroupSummary(output_dir=out), name="group_summary")
    wf.add_nodes([summary])
    ms = settings.model
    model_settings = {k: v for k, v in dataclasses.asdict(ms).items() if k != "model_file"}
    fmri_atlas = dict(settings.workflow.fmri_atlas.entities())
    threads = settings.nipype.resolved_omp_nthreads()
    checkpoints = settings.work_dir / "checkpoints"
    for model in ms.trained_models():
        for direction in ms.directions():
            tag = f"{_node_label(model)}_{direction}"
            train = pe.Node(
                TrainModel(output_dir=out, model=model, direction=direction, settings=model_settings,
                           seed=settings.seeds.torch, fmri_atlas=fmri_atlas, inputs_digest=inputs_digest,
                           checkpoint=str(checkpoints / f"{tag}.pt"), use_gpu=use_gpu),
                name=f"train_{tag}", n_procs=threads, mem_gb=train_mem_gb)
            publish_train = pe.Node(PublishStage(output_dir=out), name=f"publish_train_{tag}",
                                    run_without_submitting=True)
            apply = pe.Node(ApplyModel(output_dir=out, mc_dropout=ms.mc_dropout, device=ms.device,
                                       seed=settings.seeds.torch, use_gpu=use_gpu),
                            name=f"apply_{tag}", n_procs=threads, mem_gb=train_mem_gb)
            publish_apply = pe.Node(PublishStage(output_dir=out), name=f"publish_apply_{tag}",
                                    run_without_submitting=True)
            wf.connect([
                (train, publish_train, [("stage_dir", "stage_dir")]),
                (train, apply, [("model_prefix", "model_prefix")]),
                (apply, publish_apply, [("stage_dir", "stage_dir")]),
            ])  # fmt:skip
    if ms.benchmark:  # every model, ablation, null and reference on one split
        bench = pe.Node(
            Benchmark(output_dir=out, bids_dir=str(settings.execution.bids_dir or ""),
                      entries=list(ms.benchmark),
                      directions=ms.directions(), settings=model_settings, seed=settings.seeds.torch,
                      fmri_atlas=fmri_atlas, inputs_digest=inputs_digest, use_gpu=use_gpu),
            name="benchmark", n_procs=threads, mem_gb=train_mem_gb)
        publish_bench = pe.Node(PublishStage(output_dir=out), name="publish_benchmark",
                                run_without_submitting=True)
        wf.connect([(bench, publish_bench, [("stage_dir", "stage_dir")])])
    from samba_pipeline.workflows.reports import add_group_reports

    add_group_reports(wf, settings)  # subject reports with their predictions, OUT/group.html
    return wf


def _node_label(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)
