"""Does an int8 export run in the training process (ONNX Runtime, OpenVINO, NNCF loaded, their thread pools
started) slow the trainings that follow it? The question behind edgekd fit's child process for the latency
table (docs/records/fit.md).

    taskset -c 0 python tools/fit_inprocess.py plain TEACHER DATA OUT
    taskset -c 0 python tools/fit_inprocess.py after_export TEACHER DATA OUT

Each distils resnet20 for 2 epochs from TEACHER (an edgekd checkpoint) on 10,000 images of DATA with one torch
thread (the test split evaluated once) and prints the images/s of each epoch; ``after_export`` first exports an
untrained resnet20 to OpenVINO int8 and ONNX int8 in the same process, as the fit's latency table did before.
Run the two one after another on the same idle core and compare.
"""

import os
import sys

from edgekd.base.cpu import short_spin_wait

short_spin_wait()  # as the edgekd command does, before torch is imported


def main(mode: str, teacher: str, data_spec: str, out: str) -> None:
    from edgekd.core.data import load_data
    from edgekd.core.distill import run_distill
    from edgekd.core.options import DistillOptions
    from edgekd.export.options import ExportOptions
    from edgekd.export.pipeline import export_checkpoint
    from edgekd.fit import latency

    os.makedirs(out, exist_ok=True)
    if mode == "after_export":
        ckpt = latency.untrained_checkpoint("resnet20", 32, load_data(data_spec, None), os.path.join(out, "m.pt"))
        for fmt in ("openvino", "onnx"):
            export_checkpoint(ckpt, ExportOptions(format=fmt, precision="int8", out=os.path.join(out, f"b-{fmt}"),
                                                  val_size=32, calib_size=32, max_drop=100.0, max_fallback_layers=0,
                                                  speed_check=False, progress=False, force=True))
    elif mode != "plain":
        raise SystemExit("mode: plain or after_export")
    m = run_distill(DistillOptions(teacher=teacher, student="resnet20", data=data_spec, train_subset=10000,
                                   teacher_views=2, teacher_cache=os.path.join(out, "cache"), threads=1, epochs=2,
                                   eval_every=2, progress=False, force=True, workers=1,
                                   out=os.path.join(out, f"distill-{mode}")))
    threads = len(os.listdir(f"/proc/{os.getpid()}/task"))
    print(f"{mode}: images/s per epoch {[round(h['images_per_s']) for h in m['history']]}, "
          f"{threads} threads in the process")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
