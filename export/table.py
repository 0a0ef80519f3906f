"""The export table of docs/export.md, from the bundles' manifests:
``python -m edgekd.export.table BUNDLE...`` prints one Markdown row per bundle.

Sizes are compared with the FP32 bundle of the same format among those given.
"""

import os
import sys

from ..bundle.manifest import read_manifest

HEADER = ("| bundle | format | precision | size (MB) | size vs FP32 | max abs diff | top-1 agreement | top-1 | "
          "drop vs FP32 (points) | images | export (s) | INT8 speedup here (b1 / b32) | layers kept in float |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def rows(folders):
    # the export's records (validation, size, timings) as the manifest's JSON object
    manifests = [(os.path.basename(os.path.normpath(f)), read_manifest(f).to_dict()) for f in folders]
    fp32_size = {m["format"]: m["size_bytes"] for _, m in manifests if m["precision"] == "fp32"}
    lines = [HEADER]
    for name, m in manifests:
        v = m["validation"]
        ratio = f"{m['size_bytes'] / fp32_size[m['format']]:.0%}" if m["format"] in fp32_size else "-"
        speed = m.get("speed_check") or {}
        speedup = " / ".join(f"{r['speedup']:.2f}x" for r in speed.get("rows", [])) or "-"
        kept = (m.get("fallback") or {}).get("layers_in_float")
        lines.append(f"| {name} | {m['format']} | {m['precision']} | {m['size_bytes'] / 1e6:.3f} | {ratio} | "
                     f"{v['max_abs_diff']:.2e} | {v['top1_agreement']:.4f} | {v['top1']:.4f} | {v['drop']:+.2f} | "
                     f"{v['images']} | {m['export_seconds']:.1f} | {speedup} | "
                     f"{', '.join(kept) if kept else ('none' if kept is not None else '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(rows(sys.argv[1:]))
