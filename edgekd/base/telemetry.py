"""OpenVINO's and NNCF's usage telemetry, off in every edgekd process: the CLI's main() and edgekd's worker
processes call ``switch_off()`` first thing. Importing edgekd as a library changes nothing in the host process
(an application that wants the same calls ``edgekd.base.telemetry.switch_off()`` itself).

What we found in openvino 2026.4 with openvino-telemetry 2025.2 and nncf 3.4: nothing reads an
opt-out variable (``OPENVINO_TELEMETRY_OPT_OUT`` is read by no code at all). A plain ``import openvino``
(which imports ``openvino.tools.ovc``), each ``convert_model`` and ``import nncf`` create
``openvino_telemetry.Telemetry``, which asks ``OptInChecker.check()`` for consent; with no consent
file in ``~/intel`` both callers (``enable_opt_in_dialog=False``) take that as consent, write a client
id and a usage count under ``~/intel`` and send events to Google Analytics. The package's own opt-out
(``opt_in_out --opt_out``) writes the user's consent file, a choice for every OpenVINO tool that is
not ours to make. So edgekd answers the consent check "declined" inside its own processes: then
nothing is counted, written or sent, and the user's files are untouched.

ONNX Runtime 1.32 (its "1DS" telemetry on Linux) writes a persistent ``deviceid`` and an event queue
(``onnxruntime.db``) under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` as soon as it is imported.
It reads ``ORT_DISABLE_TELEMETRY`` when it starts: switch_off sets it, before anything imports it, and it is
inherited by every process edgekd starts (bench workers, export's converters); the device runner sets it too.
"""

import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any, Optional, Sequence

ORT_OPT_OUT = "ORT_DISABLE_TELEMETRY"

_CHECKER = "openvino_telemetry.utils.opt_in_checker"


def decline(module: ModuleType) -> None:
    """Make the consent check of an imported ``opt_in_checker`` module answer DECLINED, and silence any
    Telemetry object made before this (a singleton: later inits re-check consent, and are declined)."""
    declined = module.ConsentCheckResult.DECLINED
    module.OptInChecker.check = lambda self, *args, **kwargs: declined
    main = sys.modules.get("openvino_telemetry.main")
    instance = getattr(getattr(main, "Telemetry", None), "_SingletonMetaClass__single_instance", None)
    if instance is not None:
        instance.consent = False


class _DeclineOnImport:
    """Finds ``openvino_telemetry.utils.opt_in_checker`` like the normal path finder, then declines it
    right after it runs: before openvino or nncf can create their Telemetry object. (A meta path finder
    and loader by duck typing: importlib.abc alone costs 30 ms at every edgekd start.)"""

    def find_spec(self, name: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if name != _CHECKER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            self._loader: Any = spec.loader
            spec.loader = self  # type: ignore[assignment]  # a loader by duck typing (see the class docstring)
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        decline(module)


def switch_off() -> None:
    """Keep OpenVINO/NNCF and ONNX Runtime telemetry off in this process; cheap: neither is imported here."""
    os.environ[ORT_OPT_OUT] = "1"  # not setdefault: edgekd sends nothing, whatever the shell says
    if _CHECKER in sys.modules:
        decline(sys.modules[_CHECKER])
    elif not any(isinstance(f, _DeclineOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeclineOnImport())
