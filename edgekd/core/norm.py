"""The run's input normalisation: the train split's statistics, a pretrained student's own, the seed's 0.5/0.5,
or values given with --norm (moved out of distill.py, which runs them)."""

from typing import Any, List, Optional, Tuple

from .. import EdgeKDError
from .augment import channel_stats


def parse_stats(text: str, channels: int) -> Tuple[List[float], List[float]]:
    """'M1,M2,M3/S1,S2,S3' (or one value each) -> (mean, std) lists."""
    try:
        mean_text, std_text = text.split("/")
        mean = [float(v) for v in mean_text.split(",")]
        std = [float(v) for v in std_text.split(",")]
    except ValueError:
        raise EdgeKDError(f"--norm {text!r}: use auto, train, seed or MEAN/STD such as 0.49,0.48,0.45/0.25,0.24,0.26") from None
    mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise EdgeKDError(f"--norm {text!r}: need {channels} means and {channels} positive stds")
    return mean, std


def settle_norm(data: Any, cfg: Any, input_spec: Any, train_images: Any,
                pretrained: Optional[Tuple[List[float], List[float], str]]) -> str:
    """Set data.input's mean/std for this run; returns where they came from (recorded in metrics.json).

    A pretrained student keeps the statistics its weights were trained with (ImageNet's, usually) unless
    --norm says otherwise: its first layers expect inputs scaled that way, as in any fine-tuning recipe.
    The train split's statistics come from the labelled images only, so a run with --unlabeled is
    normalised like the same run without it."""
    norm = cfg.norm or "auto"
    if input_spec is not None:
        return "checkpoint"
    if norm == "auto" and pretrained is not None:
        mean, std, source = pretrained
        data.input.mean, data.input.std = fit_channels(mean, data.input.channels), fit_channels(std, data.input.channels)
        return f"pretrained: {source}"
    if norm == "train" or (norm == "auto" and data.spec != "digits"):
        data.input.mean, data.input.std = channel_stats(train_images)
        return "train split"
    if norm not in ("auto", "seed"):
        data.input.mean, data.input.std = parse_stats(norm, data.input.channels)
        return "given (--norm)"
    return "seed (0.5/0.5)"


def fit_channels(values, channels):
    """RGB statistics for ``channels`` inputs: their average for grey (whose stem weights are RGB summed)."""
    if len(values) == channels:
        return list(values)
    return [sum(values) / len(values)] * channels
