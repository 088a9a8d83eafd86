"""`ilora export`: take a trained model away, as a merged Hugging Face model or as one clean PEFT adapter.

    ilora export TASK_OR_RUN_DIR --output DIR [--adapter stable|plastic] [--merge] [--model M]

From a task directory the adapter defaults to I-LoRA's stable one (the other methods have one); from a
run directory (`<output_dir>/<method>`), the last task's, and the adapter with the best average accuracy
in its metrics.json. What a method evaluates as the sum of several LoRAs (O-LoRA) is exported as that
sum: merged into the weights, or concatenated into one LoRA of the summed rank (exact: sum_i B_i A_i =
[B_1 ... B_k][A_1; ...; A_k]). A method whose evaluated model is not a sum of adapters (its
`merged_weights`) is exported merged only. `ilora_export.json` beside the export records where it came from.

    ilora export RUN_DIR --serve DIR [--copy_base]

writes every task's evaluated models as PEFT adapters named `<task>-<model>` for a server that holds many
LoRAs on one base (vLLM's `--enable-lora --lora-modules`), with `serve.json`: the base, each adapter's
task and accuracies from the run, and the `vllm serve` command line.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel

from ilora import __version__
from ilora.core.adapters import AdapterPair, fold_into_base, save_adapter
from ilora.errors import ILoRAError, did_you_mean, writing
from ilora.evaluation.gate import released
from ilora.files import write_json
from ilora.pipeline.models import open_task
from ilora.store import rundir, taskdir
from ilora.store.paths import check_directory_target

PROVENANCE = "ilora_export.json"
EXPORTED = "exported"  # the adapter name an unmerged export is built under


def export(
    source: Path,
    output: Path,
    adapter: str | None = None,
    merge: bool = False,
    model: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write the export into `output` (new or empty) and return it."""
    check_directory_target(output, "--output")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ILoRAError(f"--output {output} exists and is not empty; export into a new directory")
    task_dir, summary = _task_of(source)
    manifest = taskdir.read_manifest(task_dir)
    quantization = manifest.get("quantization")
    if quantization and merge:
        raise ILoRAError(
            f"{task_dir} was trained on a {quantization['bits']}-bit base: merging into quantized weights "
            "loses the adapter's precision; export the adapter (without --merge)"
        )
    task = open_task(task_dir, model, trust_remote_code)
    available = task.reports()
    report = adapter or _default_report(task.method.reports(task.options), summary, available)
    if report not in available:
        raise ILoRAError(f"--adapter {report!r}: {task_dir} offers {available}{did_you_mean(report, available)}")
    names = task.method.evaluated(task.model, task.options)[report]
    changes = task.method.merged_weights(task.model, report, task.options)
    if changes is not None and not merge:
        _refuse_unmerged(task, report, available)
    base_name = model or manifest["base_model"]["name_or_path"]
    record = {
        "source": str(source.resolve()),
        "task_dir": str(task_dir.resolve()),
        "task_id": manifest.get("task_id"),
        "method": task.method.name,
        "adapter": report,
        "adapters_summed": names if changes is None else None,
        "merged": merge,
        "base_model": {"name_or_path": base_name, "fingerprint": manifest["base_model"]["fingerprint"]},
        "metrics": _metrics_of(summary, report),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ilora_version": __version__,
    }
    if merge:
        _write_into(output, record, lambda d: _write_merged(task.model, names, changes, task.tokenizer, d))
    else:
        _write_into(output, record, lambda d: _write_adapter(task.model, names, d, _base_path(base_name)))
    return output


def _refuse_unmerged(task, report: str, available: list[str]) -> None:
    """One line: `report`'s model is dense weights, not a LoRA; say which models can be adapters."""
    # `report` is known to be dense: only the others are asked (a dense merge costs a pass over the weights)
    sums = [r for r in available if r != report and task.method.merged_weights(task.model, r, task.options) is None]
    raise ILoRAError(
        f"method {task.method.name}'s {report} model is not a sum of LoRA adapters: export it with --merge"
        + (f" (or as an adapter: --adapter {' or '.join(sums)})" if sums else "")
    )


def _write_into(output: Path, record: dict, write) -> None:
    """`write(directory)` and the provenance record, beside `output`, moved into place when complete: a
    failed export (a full disk) leaves nothing at `output`, so the retry runs as the first try did."""
    staging = output.parent / f".{output.name}.exporting-{os.getpid()}"
    try:
        with writing(output):
            staging.mkdir(parents=True)
            write(staging)
            write_json(staging / PROVENANCE, record)
            if output.exists():
                output.rmdir()  # the empty directory the user named
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _task_of(source: Path) -> tuple[Path, dict | None]:
    """A task directory as given; for a run directory, its last task and its summary."""
    if taskdir.is_finished(source):
        return source, None
    if (source / rundir.METRICS_FILE).is_file():
        from ilora.evaluation.report import load_summary

        summary = load_summary(source)
        folders = rundir.stage_dir_names(summary["method"], summary["tasks"], summary["trains_jointly"])
        last = source / rundir.TASKS_DIR / folders[-1]
        if not taskdir.is_finished(last):  # the run's own last task, whatever else tasks/ holds
            raise ILoRAError(f"{source}: its last task directory {last.name} is missing or unfinished")
        return last, summary
    raise ILoRAError(
        f"{source}: neither a finished ilora task directory nor a finished run directory (no metrics.json)"
    )


def _default_report(reports: list[str], summary: dict | None, available: list[str]) -> str:
    """A run's released model (`evaluation.gate.released`: the best average accuracy, a tie to the method's
    last report, I-LoRA's stable adapter); a task directory's last report where it saved it, else its first."""
    if summary is not None and any(r in available for r in summary["metrics"]):
        return released(summary, available)
    return reports[-1] if reports[-1] in available else reports[0]


def _metrics_of(summary: dict | None, report: str) -> dict | None:
    if summary is None:
        return None
    return {
        "run_metrics": summary["metrics"].get(report),
        "final_accuracy": summary["matrices"][report][-1],
        "tasks": summary["tasks"],
    }


def _write_merged(model: PeftModel, names: list[str], changes: dict | None, tokenizer, output: Path) -> None:
    """The evaluated model folded into the base weights (the adapters `names` summed, or the method's
    dense `changes`): a plain transformers model directory."""
    if changes is None:
        merged = model.merge_and_unload(adapter_names=names)
    else:
        fold_into_base(model, changes)
        merged = model.unload()
    merged.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))


def _write_adapter(model: PeftModel, names: list[str], output: Path, base_path: str) -> None:
    """One standard LoRA adapter (no modules_to_save): the adapter itself, or the concatenation of several."""
    config = copy.deepcopy(model.peft_config[names[0]])
    if len(names) > 1:
        configs = [model.peft_config[n] for n in names]
        if any(c.use_rslora or c.use_dora or c.r != config.r or c.lora_alpha != config.lora_alpha for c in configs):
            raise ILoRAError(f"adapters {names} differ in rank, alpha, rsLoRA or DoRA: export them with --merge")
        config.r, config.lora_alpha = config.r * len(names), config.lora_alpha * len(names)  # same alpha / r
    config.base_model_name_or_path = base_path
    config.inference_mode = True
    config.modules_to_save = None
    model.add_adapter(EXPORTED, config)
    _fill_concatenated(model, names)
    output.mkdir(parents=True, exist_ok=True)
    save_adapter(model, EXPORTED, output / ".adapter")
    model.delete_adapter(EXPORTED)  # the model stays as it was: another adapter may be exported from it
    for path in (output / ".adapter").iterdir():
        path.rename(output / path.name)
    (output / ".adapter").rmdir()


@torch.no_grad()
def _fill_concatenated(model: PeftModel, names: list[str]) -> None:
    for layer in AdapterPair(model).layers:
        if EXPORTED not in layer.lora_A:
            continue
        layer.lora_A[EXPORTED].weight.copy_(torch.cat([layer.lora_A[n].weight for n in names], dim=0))
        layer.lora_B[EXPORTED].weight.copy_(torch.cat([layer.lora_B[n].weight for n in names], dim=1))


def _base_path(name: str) -> str:
    """Where a loader finds the base: an absolute local path (the SmolLM2 cache for `smollm2`)."""
    from ilora.runtime.loader import SMOLLM2, smollm2_dir

    return str(smollm2_dir() if name == SMOLLM2 else Path(name).resolve())


# ------------------------------------------------------------------ serving
SERVE_MANIFEST = "serve.json"
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


def serve(run_dir: Path, output: Path, copy_base: bool = False, trust_remote_code: bool = False) -> Path:
    """Every task's evaluated models of a finished run, each a clean PEFT adapter `<task>-<model>` in
    `output` (new or empty), with `serve.json` and, with `copy_base`, the base model beside them."""
    check_directory_target(output, "--serve")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ILoRAError(f"--serve {output} exists and is not empty; export into a new directory")
    if not (run_dir / rundir.METRICS_FILE).is_file():
        raise ILoRAError(f"{run_dir}: not a finished run directory (no metrics.json); --serve exports a whole run")
    from ilora.evaluation.report import load_summary

    summary = load_summary(run_dir)
    folders = rundir.stage_dir_names(summary["method"], summary["tasks"], summary["trains_jointly"])
    _write_into(
        output,
        {"source": str(run_dir.resolve()), "ilora_version": __version__},
        lambda d: _write_served(run_dir, folders, summary, d, copy_base, trust_remote_code),
    )
    return output


def _write_served(run_dir: Path, folders: list[str], summary: dict, out: Path, copy_base: bool, trust: bool) -> None:
    adapters, base_path = [], None
    for k, folder in enumerate(folders, start=1):
        task_dir = run_dir / rundir.TASKS_DIR / folder
        if not taskdir.is_finished(task_dir):
            raise ILoRAError(f"{run_dir}: its task directory {folder} is missing or unfinished")
        task = open_task(task_dir, trust_remote_code=trust)
        base_path = base_path or _base_path(task.manifest["base_model"]["name_or_path"])
        for report in task.reports():
            if task.method.merged_weights(task.model, report, task.options) is not None:
                raise ILoRAError(
                    f"method {task.method.name}'s {report} model is not a sum of LoRA adapters: "
                    "it cannot be served as a LoRA (export it with --merge)"
                )
            name = f"{task.manifest['task_id']}-{report}"
            names = task.method.evaluated(task.model, task.options)[report]
            _write_adapter(task.model, names, out / name, base_path)
            row = summary["matrices"][report][k]
            adapters.append(
                {
                    "name": name,
                    "path": name,
                    "task": task.manifest["task_id"],
                    "model": report,
                    "rank": json.loads((out / name / "adapter_config.json").read_text())["r"],
                    "accuracy": dict(zip(summary["tasks"], row)),
                }
            )
    if copy_base:
        shutil.copytree(base_path, out / "base")
        base_path = "base"
    write_json(
        out / SERVE_MANIFEST,
        {"base": base_path, "adapters": adapters, "command": vllm_command(out, base_path, adapters)},
    )


def vllm_command(out: Path, base: str, adapters: list[dict]) -> str:
    """The `vllm serve` line that serves every adapter on one base, paths as the export will hold them."""
    rank = next(r for r in VLLM_RANKS if r >= max(a["rank"] for a in adapters))
    modules = " ".join(f"{a['name']}={a['path']}" for a in adapters)
    return (
        f"vllm serve {base} --enable-lora --max-lora-rank {rank} --max-loras {len(adapters)} --lora-modules {modules}"
    )
