"""The export table of docs/export.md, from the bundles' manifests:
``python -m edgekd.export.table BUNDLE...`` prints one Markdown row per bundle.

Sizes are compared with the FP32 bundle of the same format among those given.
"""

import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..base.jsonrec import read_json
from ..bundle.manifest import Manifest, read_manifest
from .records import Fallback, SpeedCheck, Validation

HEADER = ("| bundle | format | precision | size (MB) | size vs FP32 | max abs diff | top-1 agreement | top-1 | "
          "drop vs FP32 (points) | images | export (s) | INT8 speedup here (b1 / b32) | layers kept in float |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


@dataclass
class Row:
    """What one row shows of a bundle, read from its manifest (the JSON is read here, at the edge)."""

    name: str
    format: str
    precision: str
    size_bytes: int
    export_seconds: float
    validation: Validation
    speed: Optional[SpeedCheck]
    kept_in_float: Optional[List[str]]

    @classmethod
    def of(cls, name: str, m: Manifest) -> "Row":
        fallback = read_json(Fallback, m.record("fallback"))
        return cls(name, m.format, m.precision, int(m.record("size_bytes")), float(m.record("export_seconds")),
                   Validation.from_dict(m.validation), SpeedCheck.from_dict(m.record("speed_check")),
                   fallback.layers_in_float if fallback else None)

    def line(self, fp32_size: Dict[str, int]) -> str:
        ratio = f"{self.size_bytes / fp32_size[self.format]:.0%}" if self.format in fp32_size else "-"
        speedup = " / ".join(f"{r.speedup:.2f}x" for r in self.speed.rows) if self.speed else ""
        kept, v = self.kept_in_float, self.validation
        return (f"| {self.name} | {self.format} | {self.precision} | {self.size_bytes / 1e6:.3f} | {ratio} | "
                f"{v.max_abs_diff:.2e} | {v.top1_agreement:.4f} | {v.top1:.4f} | {v.drop:+.2f} | "
                f"{v.images} | {self.export_seconds:.1f} | {speedup or '-'} | "
                f"{', '.join(kept) if kept else ('none' if kept is not None else '-')} |")


def rows(folders: Sequence[str]) -> str:
    """The table's Markdown: the header and one row per bundle folder."""
    table = [Row.of(os.path.basename(os.path.normpath(f)), read_manifest(f)) for f in folders]
    fp32_size = {r.format: r.size_bytes for r in table if r.precision == "fp32"}
    return "\n".join([HEADER] + [r.line(fp32_size) for r in table])


if __name__ == "__main__":
    print(rows(sys.argv[1:]))
