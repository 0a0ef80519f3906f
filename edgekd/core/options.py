"""The options of the training commands (train, distill, quantize), written as frozen dataclasses: one field
per option with its type, default, --help text and rules (see edgekd.core.optionspec)."""

from dataclasses import dataclass
from typing import Optional

from .. import EdgeKDError
from .data import parse_size
from .optionspec import (DEFAULT_OUT, MAX_BATCH, MAX_IMAGES, MAX_INPUT_SIDE, MAX_SEED, MAX_THREADS, Options, opt,
                         register, with_default)


def _input_size_check(value: str) -> Optional[str]:
    """--teacher-input-size: H or H,W, whole numbers from 1 to MAX_INPUT_SIDE (edgekd.teachers reads it)."""
    items = [t.strip() for t in value.split(",")]
    if 1 <= len(items) <= 2 and all(t.isdecimal() and len(t) <= 5 and 1 <= int(t) <= MAX_INPUT_SIDE for t in items):
        return None
    return f"give SIZE or HEIGHT,WIDTH in pixels, whole numbers from 1 to {MAX_INPUT_SIDE}, e.g. 224"


def _size_check(value: str) -> Optional[str]:
    try:
        parse_size(value)
    except EdgeKDError as e:
        return str(e).split(": ", 1)[1]
    return None


def _norm_check(value: str) -> Optional[str]:
    if value in ("auto", "train", "seed") or "/" in value:
        return None
    return "use auto, train, seed or MEAN/STD such as 0.49,0.48,0.45/0.25,0.24,0.26"


MODEL_HELP = ("seed-teacher, seed-student, compact-student, a CIFAR ResNet (resnet8, resnet14, resnet20, resnet32, "
              "resnet44, resnet56, resnet110, resnet8x4, resnet32x4), torchvision:NAME[:WEIGHTS][:STEM] (WEIGHTS such "
              "as DEFAULT or IMAGENET1K_V1 start from pretrained weights; the small-input stem is chosen automatically "
              "at <=64 px, :small-stem or :imagenet-stem force it), timm:NAME[:pretrained], or a checkpoint path")

LOSS_HELP = ("distillation loss: kd (Hinton: alpha*T^2*KL + (1-alpha)*CE), dkd (Decoupled KD: CE + alpha*TCKD + "
             "beta*NCKD), fitnet (FitNets hint on a middle layer through a learned adapter), seed (the seed "
             "article's CE + 0.5*soft CE at T=0.5), mse (logit matching)")


@dataclass(frozen=True, kw_only=True)
class Training(Options):
    """The training options of train, distill and quantize."""

    epochs: int = opt(15, "epochs of training", low=1, high=10_000, group="training")
    eval_every: int = opt(1, "evaluate on the test split every N epochs (the last epoch always): a long schedule "
        "spends less of its time evaluating; the skipped epochs' test_top1 is null in metrics.json", low=1,
        high=10_000, metavar="N", group="training")
    skip_bad_images: bool = opt(False, "leave unreadable image files out (counted in metrics.json) instead of "
        "stopping at the first", group="training")
    batch_size: int = opt(64, "images per step", low=1, high=MAX_BATCH, group="training")
    optimizer: str = opt("sgd", "sgd (with momentum) or adamw (try --lr 0.002 --weight-decay 0.05)",
        choices=("sgd", "adamw"), group="training")
    lr: float = opt(0.05, "peak learning rate", low=0, high=10.0, low_open=True, group="training")
    schedule: str = opt("cosine", "learning-rate schedule after warm-up, per step: cosine to zero, step (x0.1 at "
        "50%% and 75%% of training) or constant (the article used constant)", choices=("cosine", "step", "constant"),
        group="training")
    warmup_epochs: float = opt(1.0, "linear learning-rate warm-up, in epochs (0 for none)", low=0, group="training")
    momentum: float = opt(0.9, "SGD momentum", low=0, high=1, high_open=True, group="training")
    weight_decay: float = opt(0.0005, "weight decay", low=0, group="training")
    label_smoothing: float = opt(0.0, "label smoothing of the hard-label term, 0..1", low=0, high=1, high_open=True,
        group="training")
    input_size: Optional[str] = opt(None, "the student's input size in pixels, H or H,W; evaluation, export, "
        "predict and the device runner resize the shorter side to size / --crop-pct and center-crop (default: the "
        "data's own size when every image has it; 224 (or a pretrained student's own) for folders of mixed sizes)",
        metavar="H[,W]", group="training", check=_size_check)
    crop_pct: Optional[float] = opt(None, "evaluation crop ratio (timm's crop_pct), recorded in the checkpoint and "
        "the bundle's manifest (default: 1.0 for data of one size, 0.875 for mixed sizes)", low=0, high=1,
        low_open=True, metavar="F", group="training")
    augment: str = opt("auto", "standard: random crop with 4-pixel padding + horizontal flip (pad-crop) for inputs "
        "up to 48 px, random-resized crop (scale --crop-scale..1, aspect 3/4..4/3) + horizontal flip above; auto: "
        "standard for photos, none for digits",
        choices=("auto", "none", "standard", "pad-crop", "random-resized-crop"), group="training")
    crop_scale: Optional[float] = opt(None, "smallest area fraction of the random-resized crop (default: by the "
        "schedule and the input: 0.5 at 64 px and 3 epochs, 0.35 at 160 px, widening to torchvision's 0.08 at 100 "
        "epochs; edgekd.core.augment.default_crop_scale)", low=0, high=1, low_open=True, metavar="F",
        group="training")
    pipeline: str = opt("auto", "memory: decode the training images once into memory; stream: decode each batch "
        "from the files in --workers processes (memory does not grow with the number of images); auto: memory for "
        "data of one size that fits in 2 GB with pad-crop or no augmentation, stream otherwise",
        choices=("auto", "memory", "stream"), group="training")
    aug_seed: int = opt(0, "seed of the augmentation parameters per (image, epoch); runs with the same seed see the "
        "same views and share a teacher cache", low=0, high=MAX_SEED, group="training")
    train_subset: Optional[int] = opt(None, "train on N images of the train split, class-stratified, fixed choice "
        "(default: all)", low=1, high=MAX_IMAGES, metavar="N", group="training")
    test_subset: Optional[int] = opt(None, "evaluate on N images of the test split, class-stratified, fixed choice "
        "(default: all): a cheaper ranking while searching (edgekd fit's trials), not a final figure; metrics.json "
        "records test_images", low=1, high=MAX_IMAGES, metavar="N", group="training")
    norm: str = opt("auto", "input normalisation: train (mean/std of the train split), seed (0.5/0.5), MEAN/STD "
        "(e.g. 0.49,0.48,0.45/0.25,0.24,0.26), auto: train except digits", metavar="STATS", group="training",
        check=_norm_check)
    bn_recalibrate: str = opt("auto", "after training, compare eval-mode with batch-statistics accuracy on training "
        "images and re-estimate batch-norm statistics when they disagree (auto), always, or never",
        choices=("auto", "always", "never"), group="training")
    seed: int = opt(0, "random seed for weights and shuffling", low=0, high=MAX_SEED, group="training")
    workers: int = opt(2, "worker processes that decode folder images (once into memory, or every batch with "
        "--pipeline stream)", low=0, high=MAX_THREADS, group="training")
    threads: Optional[int] = opt(None, "torch CPU threads (default: torch's choice; 1 is often faster on a busy "
        "machine)", low=1, high=MAX_THREADS, group="training")
    device: str = opt("cpu", "torch device to train on: cpu or cuda; under torchrun each process takes "
        "cuda:LOCAL_RANK", group="training")
    progress: bool = opt(True, "hide progress bars", group="training", negate="--no-progress")
    amp: str = opt("auto", "mixed precision on CUDA: bf16 where the GPU supports it, else fp16 with a gradient "
        "scaler (auto); off for float32. CPU runs are float32", choices=("auto", "bf16", "fp16", "off"), group="gpu")
    channels_last: str = opt("auto", "NHWC memory layout for convolutions (auto: on for CUDA; on a CPU for a "
        "PyTorch teacher only, where it measured faster, not for the student)", choices=("auto", "on", "off"),
        group="gpu")
    compile: bool = opt(False, "torch.compile the student (first steps are slow while it compiles; default: off)",
        group="gpu")

    def validate(self) -> None:
        """Mixed precision only where it exists (CPU training is float32). --warmup-epochs against --epochs is
        checked by the command line only: a teacher trained first runs these options with --teacher-epochs."""
        if self.amp in ("bf16", "fp16") and not self.device.startswith("cuda"):
            raise EdgeKDError(f"--amp {self.amp} needs --device cuda; CPU training is float32 (use --amp auto or off)")


# Patient schedules: options of train and distill (not quantize), made by functions so that both
# classes declare the same field.
def _image_store() -> Optional[str]:
    return opt(None, "decode every training picture once into a memory-mapped store under DIR (built on first "
        "use, reused by later runs on the same files; edgekd prepare builds it ahead); streamed views then cut their crops from "
        "it with no JPEG decode (default: decode the files every epoch)", metavar="DIR", group="training")


def _image_store_size() -> Optional[int]:
    return opt(None, "the store's longest picture side in pixels (default: twice the larger of the student's and "
        "the teacher's input side)", low=8, high=2 * MAX_INPUT_SIDE, metavar="N", group="training")


def _student_dtype() -> str:
    return opt("float32", "the student's forward/backward on a CPU: bfloat16 autocast (losses, soft targets, "
        "optimizer state and checkpoints stay float32), or auto: time a few steps of both on this student and "
        "input size and keep the faster (recorded in metrics.json)", choices=("float32", "bfloat16", "auto"),
        group="training")


@dataclass(frozen=True, kw_only=True)
class _TrainHead(Options):
    """The options of train before the training group (their place in --help)."""

    model: str = opt("seed-teacher", MODEL_HELP, metavar="SPEC")
    data: str = opt("digits", "digits (scikit-learn, embedded), a folder PATH or imagefolder:PATH with train/ and "
        "test/ (or val/), webdataset:PATH (the same sub-folders holding .tar shards), cifar10 or cifar100",
        metavar="SPEC")
    data_root: Optional[str] = opt(None, "where cifar10/cifar100 live or are downloaded to (an ImageFolder copy is "
        "read in place)", metavar="DIR")


@register("train")
@dataclass(frozen=True, kw_only=True)
class TrainOptions(Training, _TrainHead):
    """The options of ``edgekd train``."""

    weights: Optional[str] = opt(None, "a local state dict (.pth/.pt or .safetensors) to start from, for machines "
        "without internet; head tensors that do not fit the data's classes are dropped (default: none)",
        metavar="PATH", group="pretrained")
    unlabeled: Optional[str] = opt(None, "distill: a folder of images (any nesting, no class folders) that join the "
        "training set with the teacher term only; images also in the labelled training set or the test split are "
        "skipped (default: none)", metavar="DIR", group="pretrained")
    image_store: Optional[str] = _image_store()
    image_store_size: Optional[int] = _image_store_size()
    student_dtype: str = _student_dtype()
    out: Optional[str] = opt(None, "output folder (default: none)", metavar="DIR")
    resume: Optional[str] = opt(None, "continue an interrupted run in DIR from its last complete epoch, with the "
        "options saved in DIR/config.yaml (default: a new run)", metavar="DIR")
    force: bool = opt(False, "replace the outputs of an earlier edgekd run in --out (never files edgekd did not "
        "write; default: refuse a non-empty --out)", yaml=False)
    config: Optional[str] = opt(None, "YAML file of option values (keys as in the saved config.yaml); the command "
        "line wins (default: none)", metavar="FILE", yaml=False)

    def validate(self) -> None:
        """Unlabelled images are learned from a teacher's answers, and train has none."""
        super().validate()
        _check_store_place(self.image_store, self.data, self.unlabeled)
        if self.unlabeled:
            raise EdgeKDError("--unlabeled images are learned from the teacher's answers and edgekd train has no "
                              "teacher: use edgekd distill --unlabeled DIR")


@dataclass(frozen=True, kw_only=True)
class _DistillHead(Options):
    """The options of distill before the training group (their place in --help)."""

    teacher: str = opt("seed-teacher", "the teacher: an edgekd checkpoint, a model spec to train first, or a model "
        "you bring (see 'bring your own teacher' below)", metavar="SPEC")
    student: str = opt("compact-student", MODEL_HELP, metavar="SPEC")
    teacher_epochs: Optional[int] = opt(None, "epochs for a teacher trained here (default: --epochs)", low=1,
        high=10_000)
    loss: str = opt("kd", LOSS_HELP, metavar="NAME")
    temperature: Optional[float] = opt(None, "softmax temperature (default: the loss's own, kd 4, dkd 4, seed 0.5)",
        low=0, low_open=True, flags=("-T",))
    alpha: Optional[float] = opt(None, "weight of the teacher term, 0..1 (default: the loss's own: kd 0.9, seed "
        "0.5, mse 0.9; dkd: TCKD weight 1, any size; fitnet: weight of an added logit KD term, 0)", low=0)
    beta: Optional[float] = opt(None, "dkd: NCKD weight (default 8); fitnet: hint weight (default 100)", low=0)
    dkd_warmup: Optional[float] = opt(None, "dkd: epochs over which the distillation terms ramp in linearly "
        "(default: 20, the paper's)", low=0)
    student_layer: Optional[str] = opt(None, "fitnet: the student's hinted layer, a module name (default: auto, the "
        "middle stage)", metavar="NAME")
    teacher_layer: Optional[str] = opt(None, "fitnet: the teacher's hint layer, a module name (default: auto, the "
        "middle stage)", metavar="NAME")
    teacher_cache: Optional[str] = opt(None, "compute the teacher's logits once per (image, epoch) view into DIR "
        "(keyed by the teacher checkpoint's sha256, the augmentation seed and the data) and replay them, instead "
        "of running the teacher every step (logit losses; default: off)", metavar="DIR")
    teacher_cache_dtype: str = opt("float16", "how --teacher-cache stores logits: float16 (half the size; each "
        "logit rounded to 11 significant bits) or float32 (bit-exact)", choices=("float16", "float32"),
        group="teacher")
    teacher_cache_topk: Optional[int] = opt(None, "keep only the K largest teacher logits per view in "
        "--teacher-cache, the rest one value that keeps their share of the softmax at the loss's temperature (for "
        "teachers with many classes; default: all)", low=1, metavar="K", group="teacher")
    teacher_dtype: str = opt("auto", "the frozen teacher's compute dtype: auto is bfloat16 on a CPU with native "
        "bfloat16 (AMX-BF16 or AVX512-BF16) for a PyTorch teacher above 48 px, else float32; recorded in "
        "metrics.json", choices=("auto", "float32", "bfloat16"), group="teacher")
    teacher_input_size: Optional[str] = opt(None, "the teacher's input size in pixels, H or H,W; each view is "
        "resized to it, bilinear with antialias (default: from the teacher: bundle manifest, ONNX/IR/.pt2 input "
        "shape, ONNX metadata, torchvision/timm data config; else the data's)", metavar="H[,W]", group="teacher",
        check=_input_size_check)
    teacher_mean: Optional[str] = opt(None, "the teacher's per-channel normalisation mean, in [0, 1] pixel units "
        "(default: from the teacher; required for foreign files without edgekd.* ONNX metadata)", metavar="M[,M,M]",
        group="teacher")
    teacher_std: Optional[str] = opt(None, "the teacher's per-channel normalisation std, positive (default: from "
        "the teacher)", metavar="S[,S,S]", group="teacher")
    teacher_color: Optional[str] = opt(None, "the teacher's channel order, L for one grey channel; grey data is "
        "repeated to RGB and RGB data made grey as needed (default: from the teacher, else RGB for 3 channels)",
        choices=("RGB", "BGR", "L"), group="teacher")
    teacher_outputs: Optional[str] = opt(None, "what the teacher returns; probs are turned into log-probabilities "
        "(logits up to a constant) (default: logits, or the ONNX metadata's)", choices=("logits", "probs"),
        group="teacher")
    teacher_classes: Optional[str] = opt(None, "map the teacher's outputs to the data's classes: lines 'NAME' name "
        "every teacher output in order (then matched by name); lines 'INDEX NAME' pick output INDEX for data "
        "class NAME; lines 'INDEX' pick it for the data class of that line (default: match the names the teacher "
        "carries)", metavar="FILE", group="teacher")
    teacher_weights: Optional[str] = opt(None, "a local state dict (.pth/.pt) or .safetensors for torchvision:NAME, "
        "timm:NAME or MODULE:FUNCTION (no download) (default: none)", metavar="FILE", group="teacher")
    teacher_views: Optional[int] = opt(None, "K fixed augmented views per image, replayed across epochs (epoch e "
        "shows view (e-1) mod K + 1): with --teacher-cache a long run pays for K teacher passes, not one per "
        "epoch (default: a new view every epoch)", low=1, high=10_000, metavar="K", group="teacher")
    teacher_threads: Optional[int] = opt(None, "ONNX Runtime / OpenVINO threads of a black-box teacher (default: "
        "torch's)", low=1, high=MAX_THREADS, metavar="N", group="teacher")
    data: str = opt("digits", "digits (scikit-learn, embedded), a folder PATH or imagefolder:PATH with train/ and "
        "test/ (or val/), webdataset:PATH (the same sub-folders holding .tar shards), cifar10 or cifar100",
        metavar="SPEC")
    data_root: Optional[str] = opt(None, "where cifar10/cifar100 live or are downloaded to (an ImageFolder copy is "
        "read in place)", metavar="DIR")


@register("distill")
@dataclass(frozen=True, kw_only=True)
class DistillOptions(Training, _DistillHead):
    """The options of ``edgekd distill``."""

    student_weights: Optional[str] = opt(None, "a local state dict (.pth/.pt or .safetensors) to start from, for "
        "machines without internet; head tensors that do not fit the data's classes are dropped (default: none)",
        metavar="PATH", group="pretrained")
    unlabeled: Optional[str] = opt(None, "distill: a folder of images (any nesting, no class folders) that join the "
        "training set with the teacher term only; images also in the labelled training set or the test split are "
        "skipped (default: none)", metavar="DIR", group="pretrained")
    mix: str = opt("none", "function matching: mix pairs of training views (labelled and unlabelled alike), the "
        "student learning the teacher's answer for the mixed picture; pairs and ratios replayed from --aug-seed, so "
        "--teacher-cache holds them", choices=("none", "mixup", "cutmix"), group="training")
    mix_alpha: float = opt(1.0, "--mix strength: ratios drawn from Beta(alpha, alpha) (1: uniform)", low=0,
        low_open=True, high=100, group="training")
    image_store: Optional[str] = _image_store()
    image_store_size: Optional[int] = _image_store_size()
    student_dtype: str = _student_dtype()
    out: str = opt(DEFAULT_OUT, "output folder", metavar="DIR")
    resume: Optional[str] = opt(None, "continue an interrupted run in DIR from its last complete epoch, with the "
        "options saved in DIR/config.yaml (default: a new run)", metavar="DIR")
    force: bool = opt(False, "replace the outputs of an earlier edgekd run in --out (never files edgekd did not "
        "write; default: refuse a non-empty --out)", yaml=False)
    config: Optional[str] = opt(None, "YAML file of option values (keys as in the saved config.yaml); the command "
        "line wins (default: none)", metavar="FILE", yaml=False)

    def validate(self) -> None:
        super().validate()
        _check_cache_topk(self.teacher_cache_topk, self.teacher_cache)
        _check_store_place(self.image_store, self.data, self.unlabeled)


@dataclass(frozen=True, kw_only=True)
class _QuantizeHead(Options):
    """The options of quantize before the training group (their place in --help)."""

    student: Optional[str] = opt(None, "an FP32 student checkpoint (.pt) from edgekd distill/train (with --resume "
        "DIR: the one DIR was started from)", metavar="STUDENT", positional=True, nargs="?", required=True)
    teacher: Optional[str] = opt(None, "teacher checkpoint (default: the one the student was distilled from, or "
        "teacher.pt beside it)", metavar="PATH")
    loss: str = opt("kd", "a logit distillation loss: kd, dkd, seed, mse", metavar="NAME")
    temperature: Optional[float] = opt(None, "softmax temperature (default: the loss's own, kd 4, dkd 4, seed 0.5)",
        low=0, low_open=True, flags=("-T",))
    alpha: Optional[float] = opt(None, "weight of the teacher term, 0..1 (default: the loss's own: kd 0.9, seed "
        "0.5, mse 0.9; dkd: TCKD weight 1, any size; fitnet: weight of an added logit KD term, 0)", low=0)
    beta: Optional[float] = opt(None, "dkd: NCKD weight (default 8); fitnet: hint weight (default 100)", low=0)
    teacher_cache: Optional[str] = opt(None, "compute the teacher's logits once per (image, epoch) view into DIR "
        "(keyed by the teacher checkpoint's sha256, the augmentation seed and the data) and replay them, instead "
        "of running the teacher every step (logit losses; default: off)", metavar="DIR")
    teacher_cache_dtype: str = opt("float16", "how --teacher-cache stores logits: float16 (half the size; each "
        "logit rounded to 11 significant bits) or float32 (bit-exact)", choices=("float16", "float32"),
        group="teacher")
    teacher_cache_topk: Optional[int] = opt(None, "keep only the K largest teacher logits per view in "
        "--teacher-cache, the rest one value that keeps their share of the softmax at the loss's temperature (for "
        "teachers with many classes; default: all)", low=1, metavar="K", group="teacher")
    teacher_dtype: str = opt("auto", "the frozen teacher's compute dtype: auto is bfloat16 on a CPU with native "
        "bfloat16 (AMX-BF16 or AVX512-BF16) for a PyTorch teacher above 48 px, else float32; recorded in "
        "metrics.json", choices=("auto", "float32", "bfloat16"), group="teacher")
    calib_size: int = opt(300, "train images that set the initial quantizer ranges", low=1, high=MAX_IMAGES)
    data: Optional[str] = opt(None, "digits (scikit-learn, embedded), a folder PATH or imagefolder:PATH with train/ "
        "and test/ (or val/), webdataset:PATH (the same sub-folders holding .tar shards), cifar10 or cifar100 "
        "(default: the checkpoint's data)", metavar="SPEC")
    data_root: Optional[str] = opt(None, "where cifar10/cifar100 live or are downloaded to (an ImageFolder copy is "
        "read in place)", metavar="DIR")


@register("quantize")
@dataclass(frozen=True, kw_only=True)
class QuantizeOptions(Training, _QuantizeHead):
    """The options of ``edgekd quantize``: a short run at a small learning rate from a trained student."""

    epochs: int = with_default(Training, "epochs", 1)
    lr: float = with_default(Training, "lr", 0.001)
    warmup_epochs: float = with_default(Training, "warmup_epochs", 0.0)
    out: Optional[str] = opt(None, "output folder (default: none)", metavar="DIR")
    resume: Optional[str] = opt(None, "continue an interrupted run in DIR from its last complete epoch, with the "
        "options saved in DIR/config.yaml (default: a new run)", metavar="DIR")
    force: bool = opt(False, "replace the outputs of an earlier edgekd run in --out (never files edgekd did not "
        "write; default: refuse a non-empty --out)", yaml=False)
    config: Optional[str] = opt(None, "YAML file of option values (keys as in the saved config.yaml); the command "
        "line wins (default: none)", metavar="FILE", yaml=False)

    def validate(self) -> None:
        super().validate()
        _check_cache_topk(self.teacher_cache_topk, self.teacher_cache)


def _check_cache_topk(topk: Optional[int], cache: Optional[str]) -> None:
    """--teacher-cache-topk without --teacher-cache would silently do nothing: refuse it."""
    if topk and not cache:
        raise EdgeKDError("--teacher-cache-topk K applies to the teacher cache: add --teacher-cache DIR")


def _check_store_place(store: Optional[str], data: Optional[str], unlabeled: Optional[str]) -> None:
    """--image-store inside the data (or the --unlabeled folder) is refused before any work: edgekd never writes
    into the data. (edgekd.core.image_store checks it again where it builds.)"""
    import os

    if not store:
        return
    path = data.split(":", 1)[1] if data and data.split(":", 1)[0] in ("imagefolder", "webdataset") else data
    here = os.path.realpath(store)
    for root in [r for r in (path, unlabeled) if r and os.path.isdir(r)]:
        root = os.path.realpath(root)
        if here == root or here.startswith(root + os.sep):
            raise EdgeKDError(f"--image-store {store!r} is inside the data folder {root!r}: choose a folder outside "
                              "it (edgekd never writes into the data)")


@register("prepare")
@dataclass(frozen=True, kw_only=True)
class PrepareOptions(Options):
    """The options of ``edgekd prepare``: the decode-once image store, built ahead of training."""

    data: Optional[str] = opt(None, "the data whose training pictures go into the store: a folder PATH, "
        "imagefolder:PATH, webdataset:PATH, cifar10 or cifar100", metavar="DATA", positional=True)
    out: Optional[str] = opt(None, "the store's folder: give the same DIR as --image-store to train and distill, "
        "which then cut their crops from it", metavar="DIR", required=True)
    max_size: Optional[int] = opt(None, "the stored pictures' longest side in pixels; give the runs the same N "
        "as --image-store-size (default: twice the data's own input side, which is what a run's default is for the "
        "default student when the teacher's input is not larger)",
        low=8, high=2 * MAX_INPUT_SIDE, metavar="N")
    data_root: Optional[str] = opt(None, "where cifar10/cifar100 live (as train and distill)", metavar="DIR")
    unlabeled: Optional[str] = opt(None, "the --unlabeled folder of the runs that will use the store", metavar="DIR")
    train_subset: Optional[int] = opt(None, "the --train-subset of the runs that will use the store", low=1,
        high=MAX_IMAGES, metavar="N")
    workers: int = opt(0, "decoding processes", low=0, high=MAX_THREADS)
    progress: bool = opt(True, "hide the progress bar", negate="--no-progress")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise EdgeKDError("edgekd prepare needs DATA: a folder PATH, imagefolder:PATH, webdataset:PATH, cifar10 "
                              "or cifar100")
        _check_store_place(self.out, self.data, self.unlabeled)
