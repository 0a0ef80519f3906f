"""One typed, validated configuration per command: every option declared once, here.

Each command's options are a list of ``Opt`` below. The command line is generated from them
(``add_options``), and ``resolve`` builds the run's configuration from the defaults, a ``--config``
YAML file (or the ``config.yaml`` that ``--resume DIR`` reads) and the command line, in that order,
converting and checking every value with the same ``check``: the same types, ranges and choices and
the same one-line error whichever way a value came in. NaN and infinity are refused wherever a
number is taken; an unknown YAML key is named with the closest valid one.

Each table also makes the command's typed options, a frozen dataclass (``TrainOptions``,
``DistillOptions``, ``QuantizeOptions``, ``ExportOptions``, ``BenchOptions``, ``PredictOptions``,
``DeployOptions``; ``CLASSES[command]``) with one field per option and the option's default. ``resolve``
returns one; the rest of edgekd reads attributes (``opts.epochs``), and a Python caller building one
(``ExportOptions(format="onnx", out="b")``) gets the same checks. ``saved(opts)`` is what config.yaml
records.

Adding an option is one line in its command's list (the flag is the name with dashes)::

    Opt("teacher_input_size", "int", None, "the teacher's input size in pixels (default: the data's)", low=1),

``Opt`` fields: ``name`` (the config.yaml key and the attribute on ``args``), ``kind`` ("int",
"float", "str", "bool" or "list"), ``default``, ``help`` ("(default: X)" is appended unless the help
already says "default"), ``low``/``high`` (bounds, inclusive unless ``low_open``/``high_open``),
``choices``, ``item`` (the kind of a list's items), ``flags`` (extra spellings such as "-T"),
``metavar``, ``group`` (a --help section in GROUPS), ``positional`` (with ``nargs``), ``negate``
(a bool that defaults to true and has an off switch such as --no-progress), ``required``, ``check``
(a function ``value -> message or None`` for rules beyond a range), ``yaml=False`` for control
options that only the command line takes (--force, --config).
"""

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

from .. import EdgeKDError

DEFAULT_OUT = os.path.join("runs", "default")
# Upper bounds of the size options: beyond them a value is a typo (or an attack), not a plan, and would
# only fail later after allocating memory. Seeds are what numpy and torch's generators all take.
MAX_SEED = 2 ** 32 - 1
MAX_BATCH = 65_536
MAX_IMAGES = 10_000_000    # images in a sample (--val-size, --calib-size, --limit, --train-subset)
MAX_THREADS = 1024
MAX_TIMEOUT = 7 * 24 * 3600
MAX_INPUT_SIDE = 4096      # --teacher-input-size: a 4096x4096 RGB view is already 200 MB per image in float32
# A config file is a few hundred bytes of option: value lines; these bound what parsing one may cost.
MAX_CONFIG_BYTES = 1024 ** 2
MAX_YAML_DEPTH = 16
MAX_YAML_NODES = 100_000   # nodes after alias expansion: a 1 KB "billion laughs" file would expand to billions
# Keys that saved config.yaml files carry for the record; a config file may hold them, they set nothing.
RECORD_ONLY = ("loss_params", "command", "resume", "teacher_resolved")


@dataclass(frozen=True)
class Opt:
    name: str
    kind: str
    default: Any
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[Tuple[str, ...]] = None
    item: str = "str"
    flags: Tuple[str, ...] = ()
    metavar: Optional[str] = None
    group: Optional[str] = None
    positional: bool = False
    nargs: Optional[str] = None
    negate: Optional[str] = None
    required: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None
    yaml: bool = True

    @property
    def flag(self) -> str:
        return self.name if self.positional else "--" + self.name.replace("_", "-")


def _input_size_check(value):
    """--teacher-input-size: H or H,W, whole numbers from 1 to MAX_INPUT_SIDE (edgekd.teachers reads it)."""
    items = [t.strip() for t in value.split(",")]
    if 1 <= len(items) <= 2 and all(t.isdecimal() and len(t) <= 5 and 1 <= int(t) <= MAX_INPUT_SIDE for t in items):
        return None
    return f"give SIZE or HEIGHT,WIDTH in pixels, whole numbers from 1 to {MAX_INPUT_SIDE}, e.g. 224"


def _size_check(value):
    from .data import parse_size

    try:
        parse_size(value)
    except EdgeKDError as e:
        return str(e).split(": ", 1)[1]
    return None


def _norm_check(value):
    if value in ("auto", "train", "seed") or "/" in value:
        return None
    return "use auto, train, seed or MEAN/STD such as 0.49,0.48,0.45/0.25,0.24,0.26"


MODEL_HELP = ("seed-teacher, seed-student, compact-student, a CIFAR ResNet (resnet8, resnet14, resnet20, resnet32, "
              "resnet44, resnet56, resnet110, resnet8x4, resnet32x4), torchvision:NAME[:WEIGHTS][:STEM] (WEIGHTS such "
              "as DEFAULT or IMAGENET1K_V1 start from pretrained weights; the small-input stem is chosen automatically "
              "at <=64 px, :small-stem or :imagenet-stem force it), timm:NAME[:pretrained], or a checkpoint path")

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


def _pretrained(weights_option):
    """Pretrained starting weights and unlabelled images (checked again in edgekd.models.check_student and
    edgekd.data.load_unlabeled): --weights for train, --student-weights for distill."""
    return [
        Opt(weights_option, "str", None, "a local state dict (.pth/.pt or .safetensors) to start from, for machines "
            "without internet; head tensors that do not fit the data's classes are dropped (default: none)",
            metavar="PATH", group="pretrained"),
        Opt("unlabeled", "str", None, "distill: a folder of images (any nesting, no class folders) that join the "
            "training set with the teacher term only; images also in the labelled training set or the test split "
            "are skipped (default: none)", metavar="DIR", group="pretrained"),
    ]


# The options of a teacher the user brings (edgekd.teachers.TeacherOptions checks their contents again).
TEACHER_SOURCE = [
    Opt("teacher_input_size", "str", None, "the teacher's input size in pixels, H or H,W; each view is resized to "
        "it, bilinear with antialias (default: from the teacher: bundle manifest, ONNX/IR/.pt2 input shape, ONNX "
        "metadata, torchvision/timm data config; else the data's)", metavar="H[,W]", check=_input_size_check,
        group="teacher"),
    Opt("teacher_mean", "str", None, "the teacher's per-channel normalisation mean, in [0, 1] pixel units (default: "
        "from the teacher; required for foreign files without edgekd.* ONNX metadata)", metavar="M[,M,M]",
        group="teacher"),
    Opt("teacher_std", "str", None, "the teacher's per-channel normalisation std, positive (default: from the "
        "teacher)", metavar="S[,S,S]", group="teacher"),
    Opt("teacher_color", "str", None, "the teacher's channel order, L for one grey channel; grey data is repeated to "
        "RGB and RGB data made grey as needed (default: from the teacher, else RGB for 3 channels)",
        choices=("RGB", "BGR", "L"), group="teacher"),
    Opt("teacher_outputs", "str", None, "what the teacher returns; probs are turned into log-probabilities (logits "
        "up to a constant) (default: logits, or the ONNX metadata's)", choices=("logits", "probs"), group="teacher"),
    Opt("teacher_classes", "str", None, "map the teacher's outputs to the data's classes: lines 'NAME' name every "
        "teacher output in order (then matched by name); lines 'INDEX NAME' pick output INDEX for data class NAME; "
        "lines 'INDEX' pick it for the data class of that line (default: match the names the teacher carries)",
        metavar="FILE", group="teacher"),
    Opt("teacher_weights", "str", None, "a local state dict (.pth/.pt) or .safetensors for torchvision:NAME, "
        "timm:NAME or MODULE:FUNCTION (no download) (default: none)", metavar="FILE", group="teacher"),
    Opt("teacher_views", "int", None, "K fixed augmented views per image, replayed across epochs (epoch e shows view "
        "(e-1) mod K + 1): with --teacher-cache a long run pays for K teacher passes, not one per epoch (default: a "
        "new view every epoch)", low=1, high=10_000, metavar="K", group="teacher"),
    Opt("teacher_threads", "int", None, "ONNX Runtime / OpenVINO threads of a black-box teacher (default: torch's)",
        low=1, high=MAX_THREADS, metavar="N", group="teacher"),
]


def _data(default="digits"):
    return [
        Opt("data", "str", default, "digits (scikit-learn, embedded), a folder PATH or imagefolder:PATH with train/ "
            "and test/ (or val/), webdataset:PATH (the same sub-folders holding .tar shards), cifar10 or cifar100"
            + ("" if default else " (default: the checkpoint's data)"),
            metavar="SPEC"),
        Opt("data_root", "str", None, "where cifar10/cifar100 live or are downloaded to (an ImageFolder copy is read "
            "in place)", metavar="DIR"),
    ]


TRAINING = [
    Opt("epochs", "int", 15, "epochs of training", low=1, high=10_000, group="training"),
    Opt("skip_bad_images", "bool", False, "leave unreadable image files out (counted in metrics.json) instead of "
        "stopping at the first", group="training"),
    Opt("batch_size", "int", 64, "images per step", low=1, high=MAX_BATCH, group="training"),
    Opt("optimizer", "str", "sgd", "sgd (with momentum) or adamw (try --lr 0.002 --weight-decay 0.05)",
        choices=("sgd", "adamw"), group="training"),
    Opt("lr", "float", 0.05, "peak learning rate", low=0, low_open=True, high=10.0, group="training"),
    Opt("schedule", "str", "cosine", "learning-rate schedule after warm-up, per step: cosine to zero, step (x0.1 at "
        "50%% and 75%% of training) or constant (the article used constant)", choices=("cosine", "step", "constant"),
        group="training"),
    Opt("warmup_epochs", "float", 1.0, "linear learning-rate warm-up, in epochs (0 for none)", low=0, group="training"),
    Opt("momentum", "float", 0.9, "SGD momentum", low=0, high=1, high_open=True, group="training"),
    Opt("weight_decay", "float", 5e-4, "weight decay", low=0, group="training"),
    Opt("label_smoothing", "float", 0.0, "label smoothing of the hard-label term, 0..1", low=0, high=1,
        high_open=True, group="training"),
    Opt("input_size", "str", None, "the student's input size in pixels, H or H,W; evaluation, export, predict and "
        "the device runner resize the shorter side to size / --crop-pct and center-crop (default: the data's own "
        "size when every image has it; 224 (or a pretrained student's own) for folders of mixed sizes)",
        metavar="H[,W]", check=_size_check, group="training"),
    Opt("crop_pct", "float", None, "evaluation crop ratio (timm's crop_pct), recorded in the checkpoint and the "
        "bundle's manifest (default: 1.0 for data of one size, 0.875 for mixed sizes)", low=0, low_open=True, high=1,
        metavar="F", group="training"),
    Opt("augment", "str", "auto", "standard: random crop with 4-pixel padding + horizontal flip (pad-crop) for inputs "
        "up to 48 px, random-resized crop (scale --crop-scale..1, aspect 3/4..4/3) + horizontal flip above; auto: "
        "standard for photos, none for digits", choices=("auto", "none", "standard", "pad-crop",
                                                         "random-resized-crop"), group="training"),
    Opt("crop_scale", "float", None, "smallest area fraction of the random-resized crop (default: by the schedule "
        "and the input: 0.5 at 64 px and 3 epochs, 0.35 at 160 px, widening to torchvision's 0.08 at 100 epochs; "
        "edgekd.core.augment.default_crop_scale)", low=0, low_open=True, high=1, metavar="F", group="training"),
    Opt("pipeline", "str", "auto", "memory: decode the training images once into memory; stream: decode each batch "
        "from the files in --workers processes (memory does not grow with the number of images); auto: memory for "
        "data of one size that fits in 2 GB with pad-crop or no augmentation, stream otherwise",
        choices=("auto", "memory", "stream"), group="training"),
    Opt("aug_seed", "int", 0, "seed of the augmentation parameters per (image, epoch); runs with the same seed see "
        "the same views and share a teacher cache", low=0, high=MAX_SEED, group="training"),
    Opt("train_subset", "int", None, "train on N images of the train split, class-stratified, fixed choice "
        "(default: all)", low=1, high=MAX_IMAGES, metavar="N", group="training"),
    Opt("norm", "str", "auto", "input normalisation: train (mean/std of the train split), seed (0.5/0.5), MEAN/STD "
        "(e.g. 0.49,0.48,0.45/0.25,0.24,0.26), auto: train except digits", metavar="STATS", check=_norm_check,
        group="training"),
    Opt("bn_recalibrate", "str", "auto", "after training, compare eval-mode with batch-statistics accuracy on "
        "training images and re-estimate batch-norm statistics when they disagree (auto), always, or never",
        choices=("auto", "always", "never"), group="training"),
    Opt("seed", "int", 0, "random seed for weights and shuffling", low=0, high=MAX_SEED, group="training"),
    Opt("workers", "int", 2, "worker processes that decode folder images (once into memory, or every batch with "
        "--pipeline stream)", low=0, high=MAX_THREADS, group="training"),
    Opt("threads", "int", None, "torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)",
        low=1, high=MAX_THREADS, group="training"),
    Opt("device", "str", "cpu", "torch device to train on: cpu or cuda; under torchrun each process takes "
        "cuda:LOCAL_RANK", group="training"),
    Opt("progress", "bool", True, "hide progress bars", negate="--no-progress", group="training"),
    Opt("amp", "str", "auto", "mixed precision on CUDA: bf16 where the GPU supports it, else fp16 with a gradient "
        "scaler (auto); off for float32. CPU runs are float32", choices=("auto", "bf16", "fp16", "off"), group="gpu"),
    Opt("channels_last", "str", "auto", "NHWC memory layout for convolutions (auto: on for CUDA; on a CPU for a "
        "PyTorch teacher only, where it measured faster, not for the student)",
        choices=("auto", "on", "off"), group="gpu"),
    Opt("compile", "bool", False, "torch.compile the student (first steps are slow while it compiles; default: off)",
        group="gpu"),
]


def _common(out_default=None, resumable=False, out_required=True):
    opts = [Opt("out", "str", out_default, "output folder" + ("" if out_default else " (default: none)"),
                metavar="DIR", required=out_required and out_default is None and not resumable)]
    if resumable:
        opts.append(Opt("resume", "str", None, "continue an interrupted run in DIR from its last complete epoch, "
                        "with the options saved in DIR/config.yaml (default: a new run)", metavar="DIR"))
    opts += [Opt("force", "bool", False, "replace the outputs of an earlier edgekd run in --out (never files edgekd "
                 "did not write; default: refuse a non-empty --out)", yaml=False),
             Opt("config", "str", None, "YAML file of option values (keys as in the saved config.yaml); the command "
                 "line wins (default: none)", metavar="FILE", yaml=False)]
    return opts


LOSS_HELP = ("distillation loss: kd (Hinton: alpha*T^2*KL + (1-alpha)*CE), dkd (Decoupled KD: CE + alpha*TCKD + "
             "beta*NCKD), fitnet (FitNets hint on a middle layer through a learned adapter), seed (the seed "
             "article's CE + 0.5*soft CE at T=0.5), mse (logit matching)")

# issue 27 (patient schedules): the decode-once image store and the student's compute dtype, train and distill
PATIENCE = [
    Opt("image_store", "str", None, "decode every training picture once into a memory-mapped store under DIR "
        "(built on first use, reused by later runs on the same files; see edgekd prepare); streamed views then cut "
        "their crops from it with no JPEG decode (default: decode the files every epoch)", metavar="DIR",
        group="training"),
    Opt("image_store_size", "int", None, "the store's longest picture side in pixels (default: twice the larger "
        "of the student's and the teacher's input side)", low=8, high=2 * MAX_INPUT_SIDE, metavar="N",
        group="training"),
    Opt("student_dtype", "str", "float32", "the student's forward/backward on a CPU: bfloat16 autocast (losses, "
        "soft targets, optimizer state and checkpoints stay float32), or auto: time a few steps of both on this "
        "student and input size and keep the faster (recorded in metrics.json)",
        choices=("float32", "bfloat16", "auto"), group="training"),
]

TRAIN = ([Opt("model", "str", "seed-teacher", MODEL_HELP, metavar="SPEC")] + _data() + TRAINING + _pretrained("weights")
         + PATIENCE + _common(resumable=True))

DISTILL = [
    Opt("teacher", "str", "seed-teacher", "the teacher: an edgekd checkpoint, a model spec to train first, or a model "
        "you bring (see 'bring your own teacher' below)", metavar="SPEC"),
    Opt("student", "str", "compact-student", MODEL_HELP, metavar="SPEC"),
    Opt("teacher_epochs", "int", None, "epochs for a teacher trained here (default: --epochs)", low=1, high=10_000),
    # Checked against the loss registry in the command (edgekd.losses imports torch).
    Opt("loss", "str", "kd", LOSS_HELP, metavar="NAME"),
    Opt("temperature", "float", None, "softmax temperature (default: the loss's own, kd 4, dkd 4, seed 0.5)", low=0,
        low_open=True, flags=("-T",)),
    Opt("alpha", "float", None, "weight of the teacher term, 0..1 (default: the loss's own: kd 0.9, seed 0.5, mse "
        "0.9; dkd: TCKD weight 1, any size; fitnet: weight of an added logit KD term, 0)", low=0),
    Opt("beta", "float", None, "dkd: NCKD weight (default 8); fitnet: hint weight (default 100)", low=0),
    Opt("dkd_warmup", "float", None, "dkd: epochs over which the distillation terms ramp in linearly (default: 20, "
        "the paper's)", low=0),
    Opt("student_layer", "str", None, "fitnet: the student's hinted layer, a module name (default: auto, the middle "
        "stage)", metavar="NAME"),
    Opt("teacher_layer", "str", None, "fitnet: the teacher's hint layer, a module name (default: auto, the middle "
        "stage)", metavar="NAME"),
    Opt("teacher_cache", "str", None, "compute the teacher's logits once per (image, epoch) view into DIR (keyed by "
        "the teacher checkpoint's sha256, the augmentation seed and the data) and replay them, instead of running the "
        "teacher every step (logit losses; default: off)", metavar="DIR"),
    Opt("teacher_cache_dtype", "str", "float16", "how --teacher-cache stores logits: float16 (half the size; each "
        "logit rounded to 11 significant bits) or float32 (bit-exact)", choices=("float16", "float32"),
        group="teacher"),
    Opt("teacher_cache_topk", "int", None, "keep only the K largest teacher logits per view in --teacher-cache, the "
        "rest one value that keeps their share of the softmax at the loss's temperature (for teachers with many "
        "classes; default: all)", low=1, metavar="K", group="teacher"),
    Opt("teacher_dtype", "str", "auto", "the frozen teacher's compute dtype: auto is bfloat16 on a CPU with native "
        "bfloat16 (AMX-BF16 or AVX512-BF16) for a PyTorch teacher above 48 px, else float32; recorded in metrics.json",
        choices=("auto", "float32", "bfloat16"), group="teacher"),
    # issue 27 (function matching); the check of the choices and alpha is edgekd.core.mixing's too
    Opt("mix", "str", "none", "function matching: mix pairs of training views (labelled and unlabelled alike), the "
        "student learning the teacher's answer for the mixed picture; pairs and ratios replayed from --aug-seed, so "
        "--teacher-cache holds them", choices=("none", "mixup", "cutmix"), group="training"),
    Opt("mix_alpha", "float", 1.0, "--mix strength: ratios drawn from Beta(alpha, alpha) (1: uniform)", low=0,
        low_open=True, high=100, group="training"),
] + TEACHER_SOURCE + _data() + TRAINING + _pretrained("student_weights") + PATIENCE + _common(out_default=DEFAULT_OUT,
                                                                                             resumable=True)

# edgekd quantize starts from a trained student: a short run at a small learning rate, no warm-up.
_QAT_DEFAULTS = {"epochs": 1, "lr": 0.001, "warmup_epochs": 0.0}
QUANTIZE = [
    Opt("student", "str", None, "an FP32 student checkpoint (.pt) from edgekd distill/train (with --resume DIR: "
        "the one DIR was started from)", metavar="STUDENT", positional=True, nargs="?", required=True),
    Opt("teacher", "str", None, "teacher checkpoint (default: the one the student was distilled from, or teacher.pt "
        "beside it)", metavar="PATH"),
    Opt("loss", "str", "kd", "a logit distillation loss: kd, dkd, seed, mse", metavar="NAME"),
] + [o for o in DISTILL if o.name in ("temperature", "alpha", "beta", "teacher_cache", "teacher_cache_dtype",
                                        "teacher_cache_topk", "teacher_dtype")] + [
    Opt("calib_size", "int", 300, "train images that set the initial quantizer ranges", low=1, high=MAX_IMAGES),
] + _data(default=None) + [replace(o, default=_QAT_DEFAULTS.get(o.name, o.default)) for o in TRAINING] + _common(
    resumable=True)

EXPORT = [
    Opt("checkpoint", "str", None, "a .pt checkpoint written by edgekd train/distill", metavar="CHECKPOINT",
        positional=True),
    Opt("format", "str", None, "bundle format: onnx or openvino", metavar="FORMAT", required=True),
    Opt("precision", "str", "fp32", "fp32, fp16 (weights halved; inputs and outputs stay float32) or int8",
        metavar="P"),
    Opt("val_size", "int", 1000, "held-out test images for the parity gate", low=1, high=MAX_IMAGES),
    Opt("atol", "float", None, "largest allowed |logit difference| from PyTorch (default: 1e-4 for fp32, 5e-2 for "
        "fp16)", low=0, low_open=True),
    Opt("opset", "int", None, "ONNX opset (default: the exporter's)", low=1, high=99),
    Opt("quant", "str", None, "static (calibrated, the default) or dynamic (ONNX only; slow for conv nets)",
        choices=("static", "dynamic"), group="int8"),
    Opt("calib_data", "str", None, "data whose train split calibrates INT8 (default: the checkpoint's data)",
        metavar="SPEC", group="int8"),
    Opt("calib_size", "int", 300, "calibration images, class-stratified", low=1, high=MAX_IMAGES, group="int8"),
    Opt("calib_method", "str", None, "ONNX: minmax (default), entropy or percentile; OpenVINO: nncf (its own "
        "statistics)", metavar="M", group="int8"),
    Opt("seed", "int", 0, "seed of the calibration sample", low=0, high=MAX_SEED, group="int8"),
    Opt("max_drop", "float", 1.0, "fail INT8 when its top-1 is more than P points below FP32", low=0, metavar="P",
        group="int8"),
    Opt("max_fallback_layers", "int", 10, "most layers kept in float to meet --max-drop; 0 turns the fallback off",
        low=0, high=100_000, group="int8"),
    Opt("tune_size", "int", None, "train images that steer the fallback (default: as many as --val-size); its cost "
        "grows with them times the number of layers", low=1, high=MAX_IMAGES, group="int8"),
    Opt("qat_epochs", "int", 1, "the INT8 ladder's last rung: when post-training INT8 and the fallback both miss "
        "--max-drop, fine-tune the student with fake quantizers against its teacher for N epochs (edgekd quantize) "
        "and export that, every layer INT8; 0 turns it off", low=0, high=10_000, metavar="N", group="int8"),
    Opt("qat_teacher", "str", None, "teacher of that rung: any --teacher spec of distill (default: the teacher the "
        "student was distilled from, else the FP32 student itself)", metavar="SPEC", group="int8"),
    Opt("qat_onnx", "str", "ort", "ONNX from a QAT checkpoint: ort (its trained weights re-quantized in ONNX Runtime's "
        "own QDQ placement, activations calibrated; runs as QLinearConv) or nncf (NNCF's trained quantizers as they "
        "are; exact to training, but ONNX Runtime then runs most convolutions in fp32)", choices=("ort", "nncf"),
        group="int8"),
    Opt("int8_types", "str", None, "ONNX: auto (by CPU features: u8s8 with VNNI, u8u8 without, s8s8 on ARM), u8s8, "
        "u8u8, s8s8 (default: auto)", metavar="T", group="int8"),
    Opt("reduce_range", "bool", False, "ONNX: 7-bit weights (for CPUs without VNNI)", group="int8"),
    Opt("per_channel", "bool", True, "ONNX: one weight scale per tensor instead of per output channel",
        negate="--per-tensor", group="int8"),
    Opt("speed_check", "bool", True, "skip the short FP32-vs-INT8 timing on this machine", negate="--no-speed-check",
        group="int8"),
    Opt("zip", "bool", False, "also pack the bundle into DIR.zip"),
    Opt("target", "str", None, "the device the bundle is for: cpu (this machine, the default), arm64, x86-avx2, "
        "x86-vnni, or ssh://[user@]host[:port][/python] (its CPU asked over SSH; the parity gate and the INT8 check "
        "run there). Sets INT8 types and, for OpenVINO on ARM, a static batch; adds parity images that deploy "
        "checks on the device", metavar="T"),
    Opt("ssh_config", "str", None, "--target ssh://: an ssh_config file (default: ~/.ssh/config)", metavar="FILE"),
    Opt("timeout", "int", 600, "--target ssh://: seconds to wait for the device at each step", low=1),
    Opt("progress", "bool", True, "hide progress bars", negate="--no-progress"),
] + _data(default=None) + _common()

# Full and --quick values of the timing options (None in the configuration means "the preset's").
BENCH_DEFAULTS = {"warmup": 20, "runs": 200, "rounds": 5, "max_time": 30.0, "min_time": 2.0}
BENCH_QUICK = {"warmup": 5, "runs": 30, "rounds": 3, "max_time": 5.0, "min_time": 0.2, "limit": 1000}


def _preset(key):
    return f"(default: {BENCH_DEFAULTS.get(key, 'the whole test split')}; --quick {BENCH_QUICK[key]})"


BENCH = [
    Opt("models", "list", None, "checkpoints (.pt) and bundle folders; teacher first", metavar="MODEL",
        positional=True, nargs="+"),
    Opt("device", "list", ["cpu"], "cpu, cuda, cuda:N, openvino:CPU, openvino:GPU, openvino:NPU, openvino:AUTO, or "
        "an edge device over SSH, ssh://[user@]host[:port][/python][?device=NPU], where the bundles run with the "
        "device's own runtime (see docs/devices.md); a device or backend that is not available becomes a row with "
        "the reason", metavar="DEV[,DEV...]"),
    Opt("ssh_config", "str", None, "an ssh_config file for ssh:// devices (default: ~/.ssh/config)", metavar="FILE"),
    Opt("timeout", "int", 600, "seconds to wait for an ssh:// device at each step", low=1, high=MAX_TIMEOUT),
    Opt("backends", "list", None, "torch, onnxruntime, openvino: run each model in every listed backend that can read "
        "it (a checkpoint through ONNX Runtime/OpenVINO is exported to ONNX first) (default: each model in its own "
        "format's runtime)", metavar="B[,B...]"),
    # no upper bound here: bench names the largest batch that fits the test images it has
    Opt("batch_sizes", "list", [1], "batch sizes to time, e.g. 1,8,32", item="int", low=1, metavar="N[,N...]"),
    Opt("warmup", "int", None, "untimed calls before timing each batch size " + _preset("warmup"), low=1,
        high=1_000_000),
    Opt("runs", "int", None, "timed calls per model and batch size, each on different test images " + _preset("runs"),
        low=1, high=1_000_000),
    Opt("rounds", "int", None, "interleaved rounds the runs are split into, visiting the models in turn "
        + _preset("rounds"), low=1, high=1000),
    Opt("max_time", "float", None, "at most S seconds of timed calls per model and batch size " + _preset("max_time"),
        low=0, low_open=True, metavar="S"),
    Opt("min_time", "float", None, "at least S seconds of timed calls per model and batch size: a model faster than "
        "S/--runs per call gets more calls, so its percentiles rest on more than a few milliseconds of the machine's "
        "state; 0 for exactly --runs calls " + _preset("min_time"), low=0, metavar="S"),
    Opt("remeasure_slow", "float", 15.0, "measure a visit again when the machine ran slow during it. Shared VMs have "
        "slow spells of seconds that slow every model alike. A visit counts when its median and the slower of two "
        "short untimed checks (just before and after it) are each within PCT%% of the fastest among the same row's "
        "visits; the others are repeated in extra rounds (at most twice --rounds). Every visit stays in "
        "results.json. 0 keeps every visit", low=0, metavar="PCT"),
    Opt("threads", "int", None, "threads for every backend: torch threads, ONNX Runtime intra-op threads, OpenVINO "
        "INFERENCE_NUM_THREADS (default: each library's own choice, or the number of --cpus)", low=1, high=MAX_THREADS),
    Opt("cpus", "str", None, "pin every worker to these CPUs, e.g. 0 or 0,1 or 0-3 (an edge profile: a smaller CPU; "
        "default: all)", metavar="LIST"),
    Opt("limit", "int", None, "accuracy on N test images spread over the split " + _preset("limit"), low=1,
        high=MAX_IMAGES),
    Opt("max_drop", "float", 1.0, "the best deployment is the fastest row within PTS top-1 points of the teacher",
        low=0, metavar="PTS"),
    Opt("compare", "str", None, "an earlier results.json (or its folder): print what got faster, slower, more or less "
        "accurate; also written to DIR/compare.md (default: none)", metavar="OLD"),
    Opt("compare_tolerance", "float", 10.0, "p50 changes within this percentage count as unchanged", low=0,
        low_open=True, metavar="PCT"),
    Opt("quick", "bool", False, "a short run: fewer warm-up and timed calls, accuracy on at most 1000 images"),
    Opt("profile", "bool", False, "after timing, per-operator times of each ONNX Runtime / OpenVINO row on the CPU "
        "(its profiler / performance counters, with the precision each layer ran in) into results.json, report.md "
        "and profile.png"),
    Opt("progress", "bool", True, "hide the progress bar", negate="--no-progress"),
] + _data(default=None) + _common()

PREDICT = [
    Opt("bundle", "str", None, "a bundle folder or .zip written by edgekd export", metavar="BUNDLE", positional=True),
    Opt("images", "list", None, "image files", metavar="IMAGE", positional=True, nargs="+"),
    Opt("top_k", "int", 1, "classes to show per image", low=1, high=100_000),
    Opt("json", "bool", False, "print JSON instead of text"),
    Opt("threads", "int", None, "runtime threads (default: the library's)", low=1, high=MAX_THREADS),
    Opt("device", "str", "cpu", "cpu, cuda for ONNX Runtime with CUDA, or an OpenVINO device name such as GPU"),
]

DEPLOY = [
    Opt("bundle", "str", None, "a bundle folder written by edgekd export", metavar="BUNDLE", positional=True),
    Opt("device", "str", None, "ssh://[user@]host[:port][:DIR]; DIR defaults to ~/edgekd-bundles on the device",
        metavar="DEVICE", positional=True),
    Opt("ssh_config", "str", None, "an ssh_config file (default: ~/.ssh/config)", metavar="FILE"),
    Opt("timeout", "int", 600, "seconds to wait for the device at each step", low=1, high=MAX_TIMEOUT),
    Opt("python", "str", None, "the device's Python that checks and runs the bundle (default: python3)",
        metavar="PATH"),
]

PREPARE = [
    Opt("data", "str", None, "the data to store: a folder PATH or imagefolder:PATH, webdataset:PATH, cifar10 or "
        "cifar100 (its training split)", metavar="DATA", positional=True, nargs="?", required=True),
    Opt("max_size", "int", None, "longest stored picture side in pixels; give what training will use (its "
        "--image-store-size, or twice the larger of the student's and the teacher's input side)", low=8,
        high=2 * MAX_INPUT_SIDE, metavar="N", required=True),
    Opt("out", "str", None, "the store folder (the same DIR as training's --image-store); never inside the data",
        metavar="DIR", required=True),
    Opt("data_root", "str", None, "where cifar10/cifar100 live", metavar="DIR"),
    Opt("unlabeled", "str", None, "also store this folder's images, as distill --unlabeled DIR adds them",
        metavar="DIR"),
    Opt("train_subset", "int", None, "store the same N-image subset as training's --train-subset N", low=1,
        high=MAX_IMAGES, metavar="N"),
    Opt("workers", "int", 2, "worker processes that decode the pictures", low=0, high=MAX_THREADS),
    Opt("progress", "bool", True, "hide progress bars", negate="--no-progress"),
]

COMMANDS = {"prepare": PREPARE, "train": TRAIN, "distill": DISTILL, "quantize": QUANTIZE, "export": EXPORT, "bench": BENCH, "predict": PREDICT, "deploy": DEPLOY}


# ---------------------------------------------------------------------------------------------
# Converting and checking one value (from the command line or YAML alike).

def _describe(opt, kind=None):
    kind = kind or opt.kind
    if kind == "int":
        text = {1: "a positive whole number", 0: "a whole number of 0 or more"}.get(opt.low, "a whole number")
    elif opt.low == 0:
        text = "a positive number" if opt.low_open else "a number of 0 or more"
    else:
        text = "a finite number"
    return text


def _range_error(opt, value, kind):
    desc = _describe(opt, kind)
    if opt.low is not None and (value < opt.low or (opt.low_open and value == opt.low)):
        return f"expected {desc}"
    if opt.high is not None and (value > opt.high or (opt.high_open and value == opt.high)):
        if opt.high_open:
            return f"expected {desc} below {opt.high:g}"
        return f"expected {desc} of at most {opt.high:,} (beyond that it is a typo, not a plan)"
    return None


def _scalar(opt, value, kind):
    """(converted value, error text or None) for one int/float/str value."""
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        return None, f"expected {_describe(opt, kind) if kind != 'str' else 'text'}"
    if kind == "str":
        return str(value), None
    try:
        if kind == "int":
            number = int(value.strip()) if isinstance(value, str) else value
            if not isinstance(number, int):
                raise ValueError
        else:
            number = float(value)
    except (ValueError, TypeError):
        return None, f"expected {_describe(opt, kind)}"
    if kind == "float" and not math.isfinite(number):
        return None, f"expected {_describe(opt, kind)}"
    return number, _range_error(opt, number, kind)


def check(opt, value, source=None):
    """``value`` (a command-line string or a YAML value) converted to the option's type; EdgeKDError
    with one line naming the option, what it takes and what it got, otherwise."""
    error, result, hint = None, value, ""
    if value is None:
        if opt.default is not None and not opt.positional:
            error = f"expected {_describe(opt) if opt.kind in ('int', 'float') else 'a value'}"
    elif opt.kind == "bool":
        if not isinstance(value, bool):
            error = "expected true or false"
    elif opt.kind == "list":
        items = value.split(",") if isinstance(value, str) else value
        items = [i.strip() if isinstance(i, str) else i for i in (items if isinstance(items, list) else [items])]
        items = [i for i in items if i != ""]
        result = []
        for item in items:
            converted, error = _scalar(opt, item, opt.item)
            if error:
                if opt.item != "str":
                    plural = _describe(opt, opt.item)[2:].replace("number", "numbers")
                    error = f"expected a comma-separated list of {plural}"
                break
            result.append(converted)
        if not error and not result:
            error = "expected a comma-separated list"
        if not opt.positional:  # a comma list names each thing once; MODEL... may repeat on purpose
            result = list(dict.fromkeys(result))
    else:
        result, error = _scalar(opt, value, opt.kind)
        if not error and opt.choices and result not in opt.choices:
            close = difflib.get_close_matches(result, opt.choices, n=1)
            error = f"expected one of {', '.join(opt.choices)}"
            hint = f"; did you mean {close[0]!r}?" if close else ""
        if not error and opt.check:
            error = opt.check(result)
    if error:
        shown = _shown(value)
        where = f" (key {opt.name} in {source})" if source else ""
        raise EdgeKDError(f"{opt.flag}: {error}, got {shown!r}{where}{hint}")
    return result


def _shown(value, limit=80):
    """A value as an error message quotes it: a list as typed, cut at ``limit`` characters (a YAML value can be
    a structure of any size; only its start is converted to text)."""
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "a mapping"
    text = str(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# The command line, generated from the tables.

def _help(opt):
    text = opt.help
    if "default" not in text and opt.default is not None and opt.kind != "bool":
        shown = "on" if opt.default is True and opt.negate else opt.default
        if isinstance(shown, list):
            shown = ",".join(map(str, shown))
        text += f" (default: {str(shown).replace('%', '%%')})"
    return text


def add_options(parser, command):
    """Add the command's options to an argparse parser. Every option's argparse default is None
    ("not given"), and every value arrives as text: ``resolve`` converts and checks it."""
    groups = {}
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


def read_yaml(path):
    """The mapping in a YAML config file, or EdgeKDError in one line. Bounded: the file's size, its nesting and
    the nodes its aliases expand to (a 1 KB alias bomb under a known key would otherwise grow to gigabytes)."""
    import yaml

    if not os.path.isfile(path):
        raise EdgeKDError(f"config file {path!r} does not exist")
    size = os.path.getsize(path)
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


def _bounded_loader(path):
    """PyYAML's SafeLoader that refuses, while composing, nesting deeper than MAX_YAML_DEPTH and documents whose
    aliases expand to more than MAX_YAML_NODES nodes. Sizes are counted once per node (a shared anchor is
    not walked again), so the count itself costs as much as the file, not as its expansion."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
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

    return Loader


def _from_yaml(command, values, source, resumed=False):
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
    yaml_path, yaml_name = given.get("config"), None
    folder = given.get("resume")
    if folder:
        yaml_path = os.path.join(folder, "config.yaml")
        if not os.path.isfile(yaml_path):
            raise EdgeKDError(f"cannot resume {folder!r}: it has no config.yaml (not an edgekd train/distill folder)")
        yaml_name = f"{yaml_path} (the run being resumed)"
        given["out"] = None
    fixed = {"out": folder, "force": True, "resume": folder} if folder else None
    return resolve(command, given, yaml_path, yaml_name, resumed=bool(folder), fixed=fixed)


def saved(opts: "Options") -> Dict[str, Any]:
    """The options of a run as config.yaml records them (control options left out)."""
    return {o.name: getattr(opts, o.name) for o in COMMANDS[opts.command] if o.yaml}


# ---------------------------------------------------------------------------------------------
# One frozen dataclass per command, generated from its table: TrainOptions, DistillOptions, ...
# The table stays the one declaration of an option (name, type, default, help, rule); the class
# gives the rest of edgekd attribute access (``opts.epochs``) and checks every value it is built
# with, so a Python caller (``ExportOptions(format="onnx", out=...)``) is held to the same rules
# as the command line and YAML.

_TYPES: Dict[str, Any] = {"int": Optional[int], "float": Optional[float], "str": Optional[str], "bool": bool,
                          "list": Optional[List[Any]]}


class Options:
    """Base of the generated option classes; ``command`` names the table a class was made from."""

    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for opt in COMMANDS[self.command]:
            value = getattr(self, opt.name)
            if value is None and (opt.positional or opt.default is None):
                continue
            object.__setattr__(self, opt.name, check(opt, value))

    def __getattr__(self, name: str) -> Any:  # only called for a name that is not a field
        raise AttributeError(f"edgekd {self.command} has no option {name!r}")


def _field(opt: Opt) -> Tuple[str, Any, Any]:
    if isinstance(opt.default, list):
        default = list(opt.default)
        return opt.name, _TYPES[opt.kind], dataclasses.field(default_factory=lambda: list(default))
    return opt.name, _TYPES[opt.kind], dataclasses.field(default=opt.default)


def _options_class(command: str) -> Type[Options]:
    name = command.capitalize() + "Options"
    cls = dataclasses.make_dataclass(
        name, [_field(o) for o in COMMANDS[command]], bases=(Options,), frozen=True, kw_only=True,
        namespace={"command": command, "__doc__": f"The options of ``edgekd {command}`` (generated from "
                                                    f"edgekd.core.config.{command.upper()})."})
    cls.__module__ = __name__  # picklable (torchrun broadcasts, worker processes)
    return cls


CLASSES: Dict[str, Type[Options]] = {command: _options_class(command) for command in COMMANDS}
TrainOptions = CLASSES["train"]
DistillOptions = CLASSES["distill"]
QuantizeOptions = CLASSES["quantize"]
ExportOptions = CLASSES["export"]
BenchOptions = CLASSES["bench"]
PredictOptions = CLASSES["predict"]
DeployOptions = CLASSES["deploy"]
