"""MODEL_CARD.md's text: Hugging Face metadata (``model-index``) and the prose, rendered from records only.

``render(manifest, block)``: ``manifest`` is the bundle's manifest.json as the card reads it (``CardManifest``),
``block`` the card's own record (``CardBlock``: the checkpoint's training record, bench's measurements,
deployments, a fit). Nothing here types a number; every figure is formatted from one of those records.
"""

from typing import Any, Dict, List, Optional

import yaml

from .card_records import CardBlock, CardManifest, Measurement, ValidationView

RUNTIMES = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
TASK = "image-classification"
MAX_CLASSES_SHOWN = 50
WORST_LAYERS = 3


def pct(x: Optional[float]) -> str:
    return "not recorded" if x is None else f"{100 * x:.2f} %"


def ms(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def mb(x: Optional[float]) -> str:
    return "not measured" if x is None else f"{x:.1f}"


def _num(x: Any) -> str:
    return "not recorded" if x is None else (f"{x:,}" if isinstance(x, int) else f"{x:.3g}")


def _or(value: Any, missing: Any = "not recorded") -> Any:
    return missing if value is None or value == "" else value


def model_name(manifest: CardManifest) -> str:
    return f"{manifest.model or 'model'} ({manifest.format} {manifest.precision})"


def where(m: Measurement) -> str:
    """A measurement's device as the card names it: the device and its CPU (emulated ones say so)."""
    cpu = f" ({m.cpu})" if m.cpu else ""
    return f"{m.device}{cpu}" + (f", emulated ({m.emulated})" if m.emulated else "")


# ---------------------------------------------------------------------------------------------- metadata

def eval_results(manifest: CardManifest, block: CardBlock) -> List[Any]:
    """HF ``EvalResult``s: the export's parity-check top-1, then one per measured (device, runtime, precision,
    threads) -- top-1 does not depend on the batch size, so batch sizes share one."""
    from huggingface_hub import EvalResult

    v = manifest.validation
    results = []

    def add(value: float, data: Any, split: str, name: str, config: str, images: Optional[int]) -> None:
        results.append(EvalResult(task_type=TASK, dataset_type=str(data), dataset_name=str(data), dataset_split=split,
                                  metric_type="accuracy", metric_value=value, metric_name=name, metric_config=config,
                                  metric_args={"images": images}))

    if v.top1 is not None:
        add(v.top1, _or(v.data or manifest.data, "unknown"), v.split,
            f"top-1 accuracy, export parity check ({manifest.runtime.library} on {_ran_on(v)})", "export", v.images)
    seen = set()
    for m in block.ok_rows:
        key = (m.device, m.cpu, m.runtime, m.precision, m.threads)
        if m.top1 is None or key in seen:
            continue
        seen.add(key)
        add(m.top1, _or(m.data, "unknown"), "test",
            f"top-1 accuracy, {m.runtime} {m.precision} on {where(m)}, {m.threads} threads",
            f"{m.device}/{m.runtime}/{m.precision}/threads={m.threads}", m.images)
    return results


def _ran_on(v: ValidationView) -> str:
    ran = v.ran_on.where
    return "the exporting machine" if ran in (None, "this machine") else str(ran)


def metadata(manifest: CardManifest, block: CardBlock) -> str:
    """The YAML front matter, written by huggingface_hub's ModelCardData (so the schema is theirs)."""
    from huggingface_hub import ModelCardData

    tags = ["edgekd", TASK, manifest.format, manifest.precision]
    if block.training.command == "distill":
        tags.append("knowledge-distillation")
    results = eval_results(manifest, block)
    meta = ModelCardData(library_name=manifest.format, pipeline_tag=TASK, tags=tags,
                         model_name=model_name(manifest), eval_results=results or None).to_dict()
    # the records last: people read the top
    return yaml.safe_dump({**meta, "edgekd": block.to_json()}, sort_keys=False, allow_unicode=True).strip()


# ---------------------------------------------------------------------------------------------- prose

def render(manifest: CardManifest, block: CardBlock) -> str:
    """The whole MODEL_CARD.md."""
    parts = [f"---\n{metadata(manifest, block)}\n---\n", _summary(manifest, block), _teacher(block),
             _data(manifest, block), _recipe(block), _export(manifest), _int8(manifest), _measured(block),
             _deployed(block), _fit(block), _untested(manifest, block), _reproduce(manifest, block)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _summary(manifest: CardManifest, block: CardBlock) -> str:
    classes = manifest.classes
    shown = ", ".join(f"`{c}`" for c in classes[:MAX_CLASSES_SHOWN])
    more = f", and {len(classes) - MAX_CLASSES_SHOWN} more (all in manifest.json)" if len(classes) > MAX_CLASSES_SHOWN else ""
    spec = manifest.input
    made = {"distill": "distilled from a teacher with `edgekd distill`", "train": "trained on labels with `edgekd "
            "train`", "quantize": "fine-tuned with INT8 fake quantizers against its teacher (`edgekd quantize`)"}
    return "\n".join([
        f"# {model_name(manifest)}", "",
        f"An image classifier for {len(classes)} classes (output index order): {shown}{more}.", "",
        f"- Model: `{_or(manifest.model)}`, {_num(manifest.params)} parameters, "
        f"{_num(manifest.flops)} FLOPs per image; {made.get(str(block.training.command), 'made by edgekd')}.",
        f"- Bundle: {manifest.format} {manifest.precision}, run by "
        f"{manifest.runtime.library}; model file `{manifest.model_file}`.",
        f"- Input: {spec.color} images resized to {spec.resize} ({spec.resize_mode or 'stretched'}), "
        f"scaled to [0, 1], normalised with mean {spec.mean} and std {spec.std}, layout "
        f"{spec.layout or 'NCHW'}.",
        "- Load it without PyTorch: `from edgekd.runtime import load_bundle` or `edgekd predict BUNDLE IMAGE...`.", ""])


def _teacher(block: CardBlock) -> str:
    t = block.training
    teacher = t.teacher
    lines = ["## Teacher", ""]
    if not teacher:
        lines.append("No teacher: " + ("trained on labels only (`edgekd train`)." if t.command == "train"
                                       else "not recorded in the checkpoint."))
        return "\n".join(lines + [""])
    images = t.data.test_images if t.data else None
    lines += ["| | |", "|---|---|",
              f"| source | `{_or(teacher.spec or teacher.model)}` ({_or(teacher.kind)}, {_or(teacher.source)}) |",
              f"| file | `{_or(teacher.file)}` |",
              f"| sha256 | `{_or(teacher.sha256)}` |",
              f"| parameters | {_num(teacher.params)} |",
              f"| teacher top-1 (PyTorch, test split, {_or(images)} images) | {pct(teacher.test_top1)} |",
              f"| student top-1 (PyTorch, the same images) | {pct(t.test_top1)} |", ""]
    return "\n".join(lines)


def _data(manifest: CardManifest, block: CardBlock) -> str:
    d = block.training.data
    lines = ["## Data", ""]
    if not d:
        return "\n".join(lines + [f"Data `{_or(manifest.data)}`; counts not recorded in the checkpoint.", ""])
    lines += [f"- Data: `{_or(d.spec)}`, {len(manifest.classes)} classes.",
              f"- Train split: {_or(d.train_images)} images ({_or(d.labelled_images)} labelled, "
              f"{_or(d.unlabeled_images, 0)} unlabelled"
              + (f" from `{d.unlabeled}`" if d.unlabeled else "") + ")"
              + (f", a subset of {d.train_subset}" if d.train_subset else "")
              + (f"; {d.skipped_bad_images} unreadable images skipped" if d.skipped_bad_images else "") + ".",
              f"- Test split: {_or(d.test_images)} images (never trained on).", ""]
    return "\n".join(lines)


def _recipe(block: CardBlock) -> str:
    t = block.training
    r = t.recipe
    params = ", ".join(f"{k} {v}" for k, v in (r.loss_params or {}).items())
    lines = ["## Recipe", "",
             f"- Loss: {_or(r.loss)}" + (f" ({params})" if params else "") + f"; {_or(r.epochs)} epochs, "
             f"batch {_or(r.batch_size)}, {_or(r.optimizer)} lr {_or(r.lr)} "
             f"({_or(r.schedule)}), seed {_or(r.seed)}.",
             f"- Input size: {_or(r.input_size)}; augmentation: {_or(r.augment)}; "
             f"initial weights: {_or(r.pretrained, 'random')}.",
             f"- Student top-1 at the end (PyTorch, test split): {pct(t.test_top1)}.",
             "- Command (from the checkpoint's config; options at their defaults left out):", "",
             f"      {_or(t.command_line)}", ""]
    return "\n".join(lines)


def _export(manifest: CardManifest) -> str:
    v = manifest.validation
    return "\n".join([
        "## Export check", "",
        f"The bundle ran in {manifest.runtime.library} on {_ran_on(v)} over {_or(v.images)} "
        f"images of the {v.split} split of `{_or(v.data)}`, against the PyTorch model on "
        f"the same images: top-1 {pct(v.top1)} (PyTorch {pct(v.reference_top1)}), top-1 agreement "
        f"{pct(v.top1_agreement)}, largest logit difference {_num(v.max_abs_diff)}.", ""])


def _int8(manifest: CardManifest) -> str:
    if manifest.precision != "int8":
        return ""
    calib, quant = manifest.calibration, manifest.quantization
    kept = manifest.fallback.layers_in_float
    report = manifest.int8_layers
    worst = sorted(report.layers, key=lambda l: -(l.loss_db or 0))[:WORST_LAYERS]
    lines = ["## INT8", "",
             f"- Calibration: {_or(calib.images)} images of the {_or(calib.split)} split of "
             f"`{_or(calib.data)}` (seed {_or(calib.seed)})" + (f"; {calib.note}" if calib.note else "") + ".",
             f"- Scheme: {_or(quant.mode)} {_or(quant.format, '')}, activations "
             f"{_or(quant.activation_type)}, weights {_or(quant.weight_type)}"
             + (f" ({quant.chosen_because})" if quant.chosen_because else "") + ".",
             "- Ladder: " + (", ".join(f"{r.rung} ({'passed' if r.passed else 'failed'}, drop "
                                       f"{_or(r.drop)} points)" for r in manifest.ladder)
                             or "not recorded") + ".",
             f"- Layers kept in float: {', '.join(f'`{n}`' for n in kept) if kept else 'none'}."]
    if worst:
        lines.append(f"- Worst layers ({report.metric}): " + "; ".join(
            f"`{l.name}` {l.op}: SQNR {l.sqnr_db} dB, adds {l.loss_db} dB" for l in worst) + ".")
    lines += [f"- Warning: {w}" for w in manifest.warnings]
    return "\n".join(lines + [""])


def _measured(block: CardBlock) -> str:
    rows = block.ok_rows
    lines = ["## Measured", ""]
    if not rows:
        return "\n".join(lines + ["Not benchmarked yet: `edgekd bench BUNDLE --device ...` adds one row here per "
                                  "device, runtime, precision, thread count and batch size.", ""])
    lines += ["| device | runtime | precision | threads | batch | p50 ms | p90 ms | peak memory MB | top-1 | images | "
              "measured (UTC) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        precision = m.precision + (f" ({m.runtime_precision})" if m.runtime_precision else "")
        lines.append(f"| {where(m)} | {m.runtime} {_or(m.runtime_version, '')} | {precision} | "
                     f"{_or(m.threads)} | {m.batch_size} | {ms(m.p50_ms)} | {ms(m.p90_ms)} | "
                     f"{mb(m.peak_rss_mb)} | {pct(m.top1)} | {_or(m.images)} | "
                     f"{_or(m.measured_utc)} |")
    if any(m.emulated for m in rows):
        lines += ["", "Timings on an emulated device are not latency (emulation is hundreds of times slower and not "
                      "by a constant factor); its top-1 is still the device's numerics."]
    return "\n".join(lines + [""])


def _deployed(block: CardBlock) -> str:
    deps = block.deployments
    if not deps:
        return ""
    lines = ["## Installed", "", "| device | path | CPU | checked there | installed (UTC) |", "|---|---|---|---|---|"]
    for d in deps:
        lines.append(f"| {d.device} | `{d.path}` | {_or(d.cpu)}{', emulated' if d.emulated else ''} "
                     f"| {d.checked} | {d.installed_utc} |")
    return "\n".join(lines + [""])


def _fit(block: CardBlock) -> str:
    fit = block.fit
    if not fit:
        return ""
    return "\n".join(["## How it was chosen (edgekd fit)", ""] + [f"- {k}: {v}" for k, v in fit.items()] + [""])


def _untested(manifest: CardManifest, block: CardBlock) -> str:
    rows = block.ok_rows
    v = manifest.validation
    lines = ["## Not tested", ""]
    if not rows:
        lines.append(f"- Latency and memory: nowhere yet; the only accuracy is the export check on {_ran_on(v)}.")
    else:
        runtimes = [r for r in RUNTIMES.get(manifest.format, ()) if r not in {m.runtime for m in rows}]
        lines += [f"- Devices other than: {', '.join(sorted({where(m) for m in rows}))}.",
                  f"- Batch sizes other than {', '.join(map(str, sorted({m.batch_size for m in rows})))}; thread "
                  f"counts other than {', '.join(sorted({str(m.threads) for m in rows}))}."]
        lines += [f"- Runtime {r} (it can load this bundle)." for r in runtimes]
    for m in block.measurements:
        if not m.ok:
            lines.append(f"- {m.runtime} on {where(m)}, batch {m.batch_size}: tried, {m.status}.")
    timed = {m.device for m in rows}
    lines += [f"- {d.device}: installed and checked, not timed there." for d in block.deployments
              if d.device not in timed]
    data = sorted({str(m.data) for m in rows} | {str(_or(v.data))})
    lines.append(f"- Images other than the test split of {', '.join(f'`{d}`' for d in data)} (your own camera, "
                 "lighting or classes are untested).")
    return "\n".join(lines + [""])


def _reproduce(manifest: CardManifest, block: CardBlock) -> str:
    t = block.training
    versions = ", ".join(f"{k} {v}" for k, v in manifest.versions.items())
    source = manifest.source
    lines = ["## Reproduce", "", "Paths in the training and export commands are relative to the bundle folder.", "",
             f"1. Train (edgekd {_or(t.edgekd)}): `{_or(t.command_line)}`",
             f"2. Export ({versions}): `{_or(block.export_command)}` from `{_or(source.checkpoint)}` "
             f"(sha256 `{_or(source.sha256)}`)."]
    commands: Dict[Optional[str], Measurement] = {}
    for m in block.ok_rows:
        commands.setdefault(m.command, m)
    for i, (command, m) in enumerate(commands.items(), 3):
        lines.append(f"{i}. Measure (edgekd {_or(m.edgekd)}, commit {_or(m.git_commit)}, "
                     f"{m.runtime} {_or(m.runtime_version)}): `{_or(command)}`")
    lines += ["", "Model files (sha256):", ""]
    lines += [f"- `{n}` {h}" for n, h in manifest.files.items() if n != "MODEL_CARD.md"]
    return "\n".join(lines + [""])
