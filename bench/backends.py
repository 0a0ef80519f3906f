"""Bench backends, registered by name: each loads one model and returns ``run(batch ndarray) -> logits``.

A backend is only ever imported inside its own worker process, so thread pools never compete.
"""

from ..registry import Registry

BACKENDS = Registry("bench backend")


@BACKENDS.register("torch", artifact="checkpoint")
def load_torch(path, threads, device):
    """PyTorch eager; inputs arrive as numpy and are wrapped without a copy."""
    import torch

    from ..checkpoint import load_model

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(path)
    model.to(device)
    cuda = device.startswith("cuda")

    @torch.inference_mode()
    def run(batch):
        out = model(torch.from_numpy(batch).to(device, non_blocking=True))
        if cuda:
            torch.cuda.synchronize()
        return out.cpu().numpy()

    return run, {"threads": torch.get_num_threads()}


@BACKENDS.register("onnxruntime", artifact="onnx")
def load_onnxruntime(path, threads, device):
    """ONNX Runtime through the bundle runtime (checksums verified, no torch imported)."""
    import os

    from ..export.runtime import load_bundle

    bundle = load_bundle(path, threads=threads, device=device)
    sess_threads = bundle.session.session.get_session_options().intra_op_num_threads
    return bundle, {"threads": sess_threads or os.cpu_count()}
