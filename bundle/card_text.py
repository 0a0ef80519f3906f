"""MODEL_CARD.md's text: Hugging Face metadata (``model-index``) and the prose, rendered from records only.

``render(manifest, block)``: ``manifest`` is the bundle's manifest.json (a dict), ``block`` the card's own record
(bundle/card.py: the checkpoint's training record, bench's measurements, deployments, a fit). Nothing here types a
number; every figure is formatted from one of those records.
"""

CARD_SCHEMA = 1
RUNTIMES = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
TASK = "image-classification"
MAX_CLASSES_SHOWN = 50
WORST_LAYERS = 3


def pct(x):
    return "not recorded" if x is None else f"{100 * x:.2f} %"


def ms(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def mb(x):
    return "not measured" if x is None else f"{x:.1f}"


def _num(x):
    return "not recorded" if x is None else (f"{x:,}" if isinstance(x, int) else f"{x:.3g}")


def _or(value, missing="not recorded"):
    return missing if value is None or value == "" else value


def model_name(manifest):
    return f"{manifest.get('model') or 'model'} ({manifest['format']} {manifest['precision']})"


def where(m):
    """A measurement's device as the card names it: the device and its CPU (emulated ones say so)."""
    cpu = f" ({m['cpu']})" if m.get("cpu") else ""
    return f"{m['device']}{cpu}" + (f", emulated ({m['emulated']})" if m.get("emulated") else "")


def ok_rows(block):
    return [m for m in block.get("measurements") or [] if m.get("status") == "ok"]


# ---------------------------------------------------------------------------------------------- metadata

def eval_results(manifest, block):
    """HF ``EvalResult``s: the export's parity-check top-1, then one per measured (device, runtime, precision,
    threads) -- top-1 does not depend on the batch size, so batch sizes share one."""
    from huggingface_hub import EvalResult

    v = manifest.get("validation") or {}
    results = []

    def add(value, data, split, name, config, images):
        results.append(EvalResult(task_type=TASK, dataset_type=str(data), dataset_name=str(data), dataset_split=split,
                                  metric_type="accuracy", metric_value=value, metric_name=name, metric_config=config,
                                  metric_args={"images": images}))

    if v.get("top1") is not None:
        add(v["top1"], _or(v.get("data") or manifest.get("data"), "unknown"), v.get("split", "test"),
            f"top-1 accuracy, export parity check ({(manifest.get('runtime') or {}).get('library')} on "
            f"{_ran_on(v)})", "export", v.get("images"))
    seen = set()
    for m in ok_rows(block):
        key = (m["device"], m.get("cpu"), m["runtime"], m["precision"], m.get("threads"))
        if m.get("top1") is None or key in seen:
            continue
        seen.add(key)
        add(m["top1"], _or(m.get("data"), "unknown"), "test",
            f"top-1 accuracy, {m['runtime']} {m['precision']} on {where(m)}, {m.get('threads')} threads",
            f"{m['device']}/{m['runtime']}/{m['precision']}/threads={m.get('threads')}", m.get("images"))
    return results


def _ran_on(v):
    ran = (v.get("ran_on") or {}).get("where")
    return "the exporting machine" if ran in (None, "this machine") else ran


def metadata(manifest, block):
    """The YAML front matter, written by huggingface_hub's ModelCardData (so the schema is theirs)."""
    from huggingface_hub import ModelCardData

    tags = ["edgekd", TASK, manifest["format"], manifest["precision"]]
    training = block.get("training") or {}
    if training.get("command") == "distill":
        tags.append("knowledge-distillation")
    results = eval_results(manifest, block)
    import yaml

    meta = ModelCardData(library_name=manifest["format"], pipeline_tag=TASK, tags=tags,
                         model_name=model_name(manifest), eval_results=results or None).to_dict()
    return yaml.safe_dump({**meta, "edgekd": block}, sort_keys=False, allow_unicode=True).strip()  # the records last: people read the top


# ---------------------------------------------------------------------------------------------- prose

def render(manifest, block):
    """The whole MODEL_CARD.md."""
    parts = [f"---\n{metadata(manifest, block)}\n---\n", _summary(manifest, block), _teacher(block),
             _data(manifest, block), _recipe(block), _export(manifest), _int8(manifest), _measured(block),
             _deployed(block), _fit(block), _untested(manifest, block), _reproduce(manifest, block)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _summary(manifest, block):
    classes = manifest["classes"]
    shown = ", ".join(f"`{c}`" for c in classes[:MAX_CLASSES_SHOWN])
    more = f", and {len(classes) - MAX_CLASSES_SHOWN} more (all in manifest.json)" if len(classes) > MAX_CLASSES_SHOWN else ""
    spec = manifest["input"]
    t = block.get("training") or {}
    made = {"distill": "distilled from a teacher with `edgekd distill`", "train": "trained on labels with `edgekd "
            "train`", "quantize": "fine-tuned with INT8 fake quantizers against its teacher (`edgekd quantize`)"}
    return "\n".join([
        f"# {model_name(manifest)}", "",
        f"An image classifier for {len(classes)} classes (output index order): {shown}{more}.", "",
        f"- Model: `{_or(manifest.get('model'))}`, {_num(manifest.get('params'))} parameters, "
        f"{_num(manifest.get('flops'))} FLOPs per image; {made.get(str(t.get('command')), 'made by edgekd')}.",
        f"- Bundle: {manifest['format']} {manifest['precision']}, run by "
        f"{(manifest.get('runtime') or {}).get('library')}; model file `{manifest['model_file']}`.",
        f"- Input: {spec.get('color')} images resized to {spec.get('resize')} ({spec.get('resize_mode', 'stretched')}), "
        f"scaled to [0, 1], normalised with mean {spec.get('mean')} and std {spec.get('std')}, layout "
        f"{spec.get('layout', 'NCHW')}.",
        "- Load it without PyTorch: `from edgekd.runtime import load_bundle` or `edgekd predict BUNDLE IMAGE...`.", ""])


def _teacher(block):
    t = block.get("training") or {}
    teacher = t.get("teacher")
    lines = ["## Teacher", ""]
    if not teacher:
        lines.append("No teacher: " + ("trained on labels only (`edgekd train`)." if t.get("command") == "train"
                                       else "not recorded in the checkpoint."))
        return "\n".join(lines + [""])
    images = (t.get("data") or {}).get("test_images")
    lines += [f"| | |", "|---|---|",
              f"| source | `{_or(teacher.get('spec') or teacher.get('model'))}` ({_or(teacher.get('kind'))}, "
              f"{_or(teacher.get('source'))}) |",
              f"| file | `{_or(teacher.get('file'))}` |",
              f"| sha256 | `{_or(teacher.get('sha256'))}` |",
              f"| parameters | {_num(teacher.get('params'))} |",
              f"| teacher top-1 (PyTorch, test split, {_or(images)} images) | {pct(teacher.get('test_top1'))} |",
              f"| student top-1 (PyTorch, the same images) | {pct(t.get('test_top1'))} |", ""]
    return "\n".join(lines)


def _data(manifest, block):
    d = (block.get("training") or {}).get("data") or {}
    lines = ["## Data", ""]
    if not d:
        return "\n".join(lines + [f"Data `{_or(manifest.get('data'))}`; counts not recorded in the checkpoint.", ""])
    lines += [f"- Data: `{_or(d.get('spec'))}`, {len(manifest['classes'])} classes.",
              f"- Train split: {_or(d.get('train_images'))} images ({_or(d.get('labelled_images'))} labelled, "
              f"{_or(d.get('unlabeled_images'), 0)} unlabelled"
              + (f" from `{d['unlabeled']}`" if d.get("unlabeled") else "") + ")"
              + (f", a subset of {d['train_subset']}" if d.get("train_subset") else "")
              + (f"; {d['skipped_bad_images']} unreadable images skipped" if d.get("skipped_bad_images") else "") + ".",
              f"- Test split: {_or(d.get('test_images'))} images (never trained on).", ""]
    return "\n".join(lines)


def _recipe(block):
    t = block.get("training") or {}
    r = t.get("recipe") or {}
    params = ", ".join(f"{k} {v}" for k, v in (r.get("loss_params") or {}).items())
    lines = ["## Recipe", "",
             f"- Loss: {_or(r.get('loss'))}" + (f" ({params})" if params else "") + f"; {_or(r.get('epochs'))} epochs, "
             f"batch {_or(r.get('batch_size'))}, {_or(r.get('optimizer'))} lr {_or(r.get('lr'))} "
             f"({_or(r.get('schedule'))}), seed {_or(r.get('seed'))}.",
             f"- Input size: {_or(r.get('input_size'))}; augmentation: {_or(r.get('augment'))}; "
             f"initial weights: {_or(r.get('pretrained'), 'random')}.",
             f"- Student top-1 at the end (PyTorch, test split): {pct(t.get('test_top1'))}.",
             "- Command (from the checkpoint's config; options at their defaults left out):", "",
             f"      {_or(t.get('command_line'))}", ""]
    return "\n".join(lines)


def _export(manifest):
    v = manifest.get("validation") or {}
    return "\n".join([
        "## Export check", "",
        f"The bundle ran in {(manifest.get('runtime') or {}).get('library')} on {_ran_on(v)} over {_or(v.get('images'))} "
        f"images of the {v.get('split', 'test')} split of `{_or(v.get('data'))}`, against the PyTorch model on "
        f"the same images: top-1 {pct(v.get('top1'))} (PyTorch {pct(v.get('reference_top1'))}), top-1 agreement "
        f"{pct(v.get('top1_agreement'))}, largest logit difference {_num(v.get('max_abs_diff'))}.", ""])


def _int8(manifest):
    if manifest["precision"] != "int8":
        return ""
    calib = manifest.get("calibration") or {}
    quant = manifest.get("quantization") or {}
    kept = (manifest.get("fallback") or {}).get("layers_in_float") or []
    report = manifest.get("int8_layers") or {}
    worst = sorted(report.get("layers") or [], key=lambda l: -(l.get("loss_db") or 0))[:WORST_LAYERS]
    lines = ["## INT8", "",
             f"- Calibration: {_or(calib.get('images'))} images of the {_or(calib.get('split'))} split of "
             f"`{_or(calib.get('data'))}` (seed {_or(calib.get('seed'))})" + (f"; {calib['note']}" if calib.get("note") else "") + ".",
             f"- Scheme: {_or(quant.get('mode'))} {_or(quant.get('format'), '')}, activations "
             f"{_or(quant.get('activation_type'))}, weights {_or(quant.get('weight_type'))}"
             + (f" ({quant['chosen_because']})" if quant.get("chosen_because") else "") + ".",
             "- Ladder: " + (", ".join(f"{r.get('rung')} ({'passed' if r.get('passed') else 'failed'}, drop "
                                       f"{_or(r.get('drop'))} points)" for r in manifest.get("ladder") or [])
                             or "not recorded") + ".",
             f"- Layers kept in float: {', '.join(f'`{n}`' for n in kept) if kept else 'none'}."]
    if worst:
        lines.append(f"- Worst layers ({report.get('metric', 'SQNR')}): " + "; ".join(
            f"`{l['name']}` {l.get('op')}: SQNR {l.get('sqnr_db')} dB, adds {l.get('loss_db')} dB" for l in worst) + ".")
    lines += [f"- Warning: {w}" for w in manifest.get("warnings") or []]
    return "\n".join(lines + [""])


def _measured(block):
    rows = ok_rows(block)
    lines = ["## Measured", ""]
    if not rows:
        return "\n".join(lines + ["Not benchmarked yet: `edgekd bench BUNDLE --device ...` adds one row here per "
                                  "device, runtime, precision, thread count and batch size.", ""])
    lines += ["| device | runtime | precision | threads | batch | p50 ms | p90 ms | peak memory MB | top-1 | images | "
              "measured (UTC) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        precision = m["precision"] + (f" ({m['runtime_precision']})" if m.get("runtime_precision") else "")
        lines.append(f"| {where(m)} | {m['runtime']} {_or(m.get('runtime_version'), '')} | {precision} | "
                     f"{_or(m.get('threads'))} | {m['batch_size']} | {ms(m.get('p50_ms'))} | {ms(m.get('p90_ms'))} | "
                     f"{mb(m.get('peak_rss_mb'))} | {pct(m.get('top1'))} | {_or(m.get('images'))} | "
                     f"{_or(m.get('measured_utc'))} |")
    if any(m.get("emulated") for m in rows):
        lines += ["", "Timings on an emulated device are not latency (emulation is hundreds of times slower and not "
                      "by a constant factor); its top-1 is still the device's numerics."]
    return "\n".join(lines + [""])


def _deployed(block):
    deps = block.get("deployments") or []
    if not deps:
        return ""
    lines = ["## Installed", "", "| device | path | CPU | checked there | installed (UTC) |", "|---|---|---|---|---|"]
    for d in deps:
        lines.append(f"| {d['device']} | `{d.get('path')}` | {_or(d.get('cpu'))}{', emulated' if d.get('emulated') else ''} "
                     f"| {d.get('checked')} | {d.get('installed_utc')} |")
    return "\n".join(lines + [""])


def _fit(block):
    fit = block.get("fit")
    if not fit:
        return ""
    return "\n".join(["## How it was chosen (edgekd fit)", ""] + [f"- {k}: {v}" for k, v in fit.items()] + [""])


def _untested(manifest, block):
    rows = ok_rows(block)
    v = manifest.get("validation") or {}
    lines = ["## Not tested", ""]
    if not rows:
        lines.append(f"- Latency and memory: nowhere yet; the only accuracy is the export check on {_ran_on(v)}.")
    else:
        runtimes = [r for r in RUNTIMES.get(manifest["format"], ()) if r not in {m["runtime"] for m in rows}]
        lines += [f"- Devices other than: {', '.join(sorted({where(m) for m in rows}))}.",
                  f"- Batch sizes other than {', '.join(map(str, sorted({m['batch_size'] for m in rows})))}; thread "
                  f"counts other than {', '.join(sorted({str(m.get('threads')) for m in rows}))}."]
        lines += [f"- Runtime {r} (it can load this bundle)." for r in runtimes]
    for m in block.get("measurements") or []:
        if m.get("status") != "ok":
            lines.append(f"- {m['runtime']} on {where(m)}, batch {m['batch_size']}: tried, {m.get('status')}.")
    timed = {m["device"] for m in rows}
    lines += [f"- {d['device']}: installed and checked, not timed there." for d in block.get("deployments") or []
              if d["device"] not in timed]
    data = sorted({str(m.get("data")) for m in rows} | {str(_or(v.get("data")))})
    lines.append(f"- Images other than the test split of {', '.join(f'`{d}`' for d in data)} (your own camera, "
                 "lighting or classes are untested).")
    return "\n".join(lines + [""])


def _reproduce(manifest, block):
    t = block.get("training") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    source = manifest.get("source") or {}
    lines = ["## Reproduce", "", "Paths in the training and export commands are relative to the bundle folder.", "",
             f"1. Train (edgekd {_or(t.get('edgekd'))}): `{_or(t.get('command_line'))}`",
             f"2. Export ({versions}): `{_or(block.get('export_command'))}` from `{_or(source.get('checkpoint'))}` "
             f"(sha256 `{_or(source.get('sha256'))}`)."]
    commands: dict = {}
    for m in ok_rows(block):
        commands.setdefault(m.get("command"), m)
    for i, (command, m) in enumerate(commands.items(), 3):
        lines.append(f"{i}. Measure (edgekd {_or(m.get('edgekd'))}, commit {_or(m.get('git_commit'))}, "
                     f"{m['runtime']} {_or(m.get('runtime_version'))}): `{_or(command)}`")
    lines += ["", "Model files (sha256):", ""]
    lines += [f"- `{n}` {h}" for n, h in manifest["files"].items() if n != "MODEL_CARD.md"]
    return "\n".join(lines + [""])
