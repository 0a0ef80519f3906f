"""One typed, validated configuration per command, built the same way from every source.

Each command's options are a frozen dataclass written in the layer of the command (``TrainOptions``,
``DistillOptions``, ``QuantizeOptions`` in edgekd.core.options, ``ExportOptions`` in export.options,
``BenchOptions`` in bench.options, ``PredictOptions`` and ``DeployOptions`` in edgekd.cli.options;
``CLASSES[command]`` once its module is imported), one field per option (see edgekd.core.optionspec). The
command line is generated from those fields (``add_options``), and ``resolve`` builds the run's options from
the defaults, a ``--config`` YAML file (or the ``config.yaml`` that ``--resume DIR`` reads) and the command
line, in that order, converting and checking every value with the same ``check``: the same types, ranges and
choices and the same one-line error whichever way a value came in. NaN and infinity are refused wherever a
number is taken; an unknown YAML key is named with the closest valid one, a key given twice is refused.
``saved(opts)`` is what config.yaml records.
"""

import argparse
import difflib
import os
from typing import Any, Dict, Optional

from .. import EdgeKDError
from ..base.files import require_regular
from .options import DistillOptions, QuantizeOptions, TrainOptions
from .optionspec import CLASSES, COMMANDS, DEFAULT_OUT, MAX_INPUT_SIDE, Opt, Options, shown_value, check

__all__ = ["CLASSES", "COMMANDS", "DEFAULT_OUT", "MAX_INPUT_SIDE", "DistillOptions", "Options", "QuantizeOptions",
           "TrainOptions", "add_options", "check", "parse_args", "read_yaml", "resolve", "saved"]

# A config file is a few hundred bytes of option: value lines; these bound what parsing one may cost.
MAX_CONFIG_BYTES = 1024 ** 2
MAX_YAML_DEPTH = 16
MAX_YAML_NODES = 100_000   # nodes after alias expansion: a 1 KB "billion laughs" file would expand to billions
# Keys that saved config.yaml files carry for the record; a config file may hold them, they set nothing.
RECORD_ONLY = ("loss_params", "command", "resume", "teacher_resolved")

TEACHER_EXAMPLES = """\
one example per teacher source (the teacher sees each view at its own size and normalisation):
  --teacher runs/t/model.pt                      an edgekd checkpoint
  --teacher resnet20                             a model spec, trained here on the data first
  --teacher runs/t-onnx  (or runs/t-onnx.zip)    an edgekd bundle (ONNX Runtime or OpenVINO, from its manifest)
  --teacher onnx:model.onnx --teacher-mean 0.485,0.456,0.406 --teacher-std 0.229,0.224,0.225
                                                 a foreign ONNX file (edgekd.* metadata, or these options)
  --teacher openvino:model.xml --teacher-mean 0.5 --teacher-std 0.5 --teacher-input-size 224
                                                 a foreign OpenVINO IR
  --teacher model.ts --teacher-mean 0.5 --teacher-std 0.5          a TorchScript file
  --teacher model.pt2 --teacher-mean 0.5 --teacher-std 0.5         a torch.export program
  --teacher torchvision:resnet18:IMAGENET1K_V1 --teacher-classes picks.txt
                                                 torchvision pretrained (or torchvision:NAME --teacher-weights F.pth)
  --teacher timm:resnet18 --teacher-weights resnet18.safetensors   timm (pretrained=True without --teacher-weights)
  --teacher mypkg.models:make_teacher --teacher-weights w.pth --teacher-mean 0.5 --teacher-std 0.5
                                                 a factory in your code (on PYTHONPATH) returning an nn.Module
"""


GROUPS = {
    "training": ("training (the seed article used --lr 0.01 --batch-size 128 --schedule constant)", None),
    "gpu": ("GPU speed and several processes",
            "Run under torchrun (torchrun --nproc_per_node N -m edgekd ...) to train in N processes: --batch-size is "
            "the global batch, split evenly over them, and --lr applies as written (README, Scaling)."),
    "int8": ("int8", None),
    "teacher": ("bring your own teacher", TEACHER_EXAMPLES),
    "pretrained": ("pretrained weights and unlabelled images",
                   "Start from pretrained weights with torchvision:NAME:WEIGHTS[:STEM] (e.g. "
                   "torchvision:mobilenet_v3_small:DEFAULT, downloaded once into torch's cache), timm:NAME:pretrained "
                   "(timm's cache; plain timm:NAME is random init) or a local file (--weights / --student-weights). "
                   "The head is replaced to fit the data's classes and, unless --norm is given, inputs are "
                   "normalised as the weights expect (ImageNet's mean/std)."),
}



def _help(opt: Opt) -> str:
    text = opt.help
    if "default" not in text and opt.default is not None and opt.kind != "bool":
        shown = "on" if opt.default is True and opt.negate else opt.default
        if isinstance(shown, list):
            shown = ",".join(map(str, shown))
        text += f" (default: {str(shown).replace('%', '%%')})"
    return text


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the command's options to an argparse parser. Every option's argparse default is None
    ("not given"), and every value arrives as text: ``resolve`` converts and checks it."""
    groups: Dict[str, Any] = {}
    for opt in COMMANDS[command]:
        target = parser
        if opt.group:
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(*GROUPS[opt.group])
            target = groups[opt.group]
        if opt.positional:
            target.add_argument(opt.name, nargs=opt.nargs, metavar=opt.metavar, help=opt.help)
        elif opt.kind == "bool":
            flag = opt.negate or opt.flag
            target.add_argument(flag, dest=opt.name, action="store_const", const=not opt.negate, default=None,
                                help=opt.help)
        else:
            metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices else None)
            target.add_argument(opt.flag, *opt.flags, dest=opt.name, default=None, metavar=metavar, help=_help(opt))


def read_yaml(path: str) -> Dict[str, Any]:
    """The mapping in a YAML config file, or EdgeKDError in one line. Bounded: the file's size, its nesting and
    the nodes its aliases expand to (a 1 KB alias bomb under a known key would otherwise grow to gigabytes)."""
    import yaml

    size = require_regular(path, "config file").st_size  # stat, never open: a FIFO would hang the read
    if size > MAX_CONFIG_BYTES:
        raise EdgeKDError(f"config file {path!r} is {size / 1e6:.1f} MB; a config file is a list of option: value "
                          f"lines (at most {MAX_CONFIG_BYTES // 1024 ** 2} MB)")
    with open(path, "rb") as f:
        text = f.read()
    try:
        values = yaml.load(text, Loader=_bounded_loader(path)) or {}
    except yaml.YAMLError as e:
        raise EdgeKDError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; a structure nested too deeply
        raise EdgeKDError(f"config file {path!r} is not a valid config file: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(values, dict):
        raise EdgeKDError(f"config file {path!r} must hold a mapping of option: value")
    return values


def _bounded_loader(path: str) -> Any:
    """PyYAML's SafeLoader that refuses, while composing, nesting deeper than MAX_YAML_DEPTH and documents whose
    aliases expand to more than MAX_YAML_NODES nodes. Sizes are counted once per node (a shared anchor is
    not walked again), so the count itself costs as much as the file, not as its expansion."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise EdgeKDError(f"config file {path!r} nests more than {MAX_YAML_DEPTH} levels deep; a config file "
                                  "is a mapping of option: value")
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            sizes = self.__dict__.setdefault("sizes", {})
            if id(node) not in sizes:
                if isinstance(node, yaml.MappingNode):
                    children = [n for pair in node.value for n in pair]
                else:
                    children = node.value if isinstance(node, yaml.SequenceNode) else []
                sizes[id(node)] = (node, 1 + sum(sizes[id(c)][1] if id(c) in sizes else 1 for c in children))
            if sizes[id(node)][1] > MAX_YAML_NODES:
                raise EdgeKDError(f"config file {path!r} expands to more than {MAX_YAML_NODES:,} values through its "
                                  "aliases (&anchor / *alias); a config file is a mapping of option: value")
            return node

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            # PyYAML lets the last of two equal keys win without a word; at any depth that is a typo, not a plan
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise EdgeKDError(f"config file {path!r} has the key {shown_value(key)!r} more than once; give "
                                          "each key once")
                    seen.add(key)
                except TypeError:  # an unhashable key: the constructor below refuses it as invalid YAML
                    break
            return super().construct_mapping(node, deep=deep)

    return Loader


def _from_yaml(command: str, values: Dict[Any, Any], source: str, resumed: bool = False) -> Dict[str, Any]:
    opts = {o.name: o for o in COMMANDS[command]}
    takes = sorted(n for n, o in opts.items() if o.yaml and not o.positional)
    out = {}
    for key, value in values.items():
        if key in RECORD_ONLY:
            continue
        opt = opts.get(key)
        # a run's own config.yaml records its positional (quantize's STUDENT): --resume takes it back
        if opt is None or not opt.yaml or (opt.positional and not resumed):
            close = difflib.get_close_matches(str(key), takes, n=1)
            if opt is not None:
                hint = f"; give {opt.flag} on the command line"
            else:
                hint = f"; did you mean {close[0]!r}?" if close else f"; {command} takes: {', '.join(takes)}"
            raise EdgeKDError(f"{source}: unknown key {key!r} for edgekd {command}{hint}")
        out[key] = check(opt, value, source)
    return out


def resolve(command: str, given: Dict[str, Any], yaml_path: Optional[str] = None,
            yaml_name: Optional[str] = None, resumed: bool = False,
            fixed: Optional[Dict[str, Any]] = None) -> "Options":
    """The run's options: defaults, then ``yaml_path``'s values, then ``given`` (the command line's
    values, text as typed; None means "not given"), every value checked the same way; ``fixed`` values
    (set by edgekd itself, such as --resume's) last."""
    opts = COMMANDS[command]
    cfg: Dict[str, Any] = {}
    if yaml_path:
        cfg.update(_from_yaml(command, read_yaml(yaml_path), yaml_name or f"config file {yaml_path!r}", resumed))
    for opt in opts:
        value = given.get(opt.name)
        if value is not None:
            cfg[opt.name] = check(opt, value)
    for opt in opts:
        if opt.required and cfg.get(opt.name, opt.default) is None:
            raise EdgeKDError(f"{opt.metavar if opt.positional else opt.flag} is required")
    return CLASSES[command](**{**cfg, **(fixed or {})})


def parse_args(ns: Any) -> "Options":
    """An argparse namespace (as ``add_options`` made it) -> the command's typed options: YAML from
    --config, or DIR/config.yaml with --resume DIR (then --out is DIR)."""
    command = ns.command
    given = {o.name: getattr(ns, o.name, None) for o in COMMANDS[command]}
    yaml_path, folder = (given.get(name) for name in ("config", "resume"))  # the options that read a config.yaml
    yaml_name = None
    if folder:
        yaml_path = os.path.join(folder, "config.yaml")
        if not os.path.isfile(yaml_path):
            raise EdgeKDError(f"cannot resume {folder!r}: it has no config.yaml (not an edgekd train/distill folder)")
        yaml_name = f"{yaml_path} (the run being resumed)"
        given = {**given, "out": None}
    fixed = {"out": folder, "force": True, "resume": folder} if folder else None
    return resolve(command, given, yaml_path, yaml_name, resumed=bool(folder), fixed=fixed)


def saved(opts: "Options") -> Dict[str, Any]:
    """The options of a run as config.yaml records them (control options left out)."""
    return {o.name: getattr(opts, o.name) for o in COMMANDS[opts.command] if o.yaml}


