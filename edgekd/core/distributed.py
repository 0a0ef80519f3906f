"""Training across processes under torchrun: DistributedDataParallel for the student, one process per device.

torchrun puts WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address in each process's
environment; edgekd reads them, so the same `edgekd train` / `edgekd distill` command runs alone or as
`torchrun --nproc_per_node N -m edgekd distill ...`. The rules (README, "Scaling"):

- ``--batch-size`` is the **global** batch: each of the N processes takes batch/N images per step,
  and DDP averages the gradients, so one step is the same optimisation whatever N is and the
  learning rate stays as configured.
- The student is wrapped in DDP; a teacher is only replicated (frozen, no wrapper, no gradients).
- Rank 0 alone writes checkpoints, metrics, the config, the teacher cache, logs and progress bars;
  the other ranks train, evaluate their share of the test split and reduce their counts with it.
- Backend ``nccl`` on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
"""

import datetime
import logging
import os
import socket

# Rank 0 builds a teacher cache while the others wait: allow a long wait before calling it a hang.
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("EDGEKD_DIST_TIMEOUT", 2 * 3600)))


def env_world_size():
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank():
    return int(os.environ.get("RANK", "0") or 0)


def env_local_rank():
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


class Context:
    """This process's place in the job. A single process is a job of one, where every call is a no-op."""

    def __init__(self, rank=0, world_size=1, local_rank=0, backend=None):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def wrap(self, model, device):
        """The student as trained: wrapped in DDP when there are several processes."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if str(device).startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, tensor):
        """The sum of ``tensor`` over all ranks (a new tensor on the same device; NCCL reduces on the GPU)."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        on_wire = tensor.to(f"cuda:{self.local_rank}") if self.backend == "nccl" else tensor.clone()
        dist.all_reduce(on_wire, op=dist.ReduceOp.SUM)
        return on_wire.to(tensor.device)

    def average_grads(self, params):
        """Average the gradients of parameters DDP does not own (a loss's learned adapter)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    def sync_buffers(self, module):
        """Copy rank 0's buffers (batch-norm running statistics) to every rank, in place.

        DDP broadcasts them at the start of each forward, but the last forward of an epoch updates
        each rank's copy with its own batch; after this every rank holds the model rank 0 saves.
        """
        if not self.enabled:
            return
        import torch.distributed as dist

        for tensor in module.buffers():
            dist.broadcast(tensor.data, src=0)

    def broadcast_object(self, obj):
        """rank 0's ``obj`` on every rank (pickled; for small things such as a resumed training state)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj):
        """A list of every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def describe(self, global_batch):
        return {"world_size": self.world_size, "backend": self.backend, "global_batch": global_batch,
                "per_process_batch": global_batch // self.world_size}

    def close(self):
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init(device):
    """Join the torchrun job described by the environment (or run alone). Returns the context and the
    device this process trains on: under torchrun on CUDA each process takes ``cuda:LOCAL_RANK``."""
    world = env_world_size()
    if world <= 1:
        return Context(), device
    import torch
    import torch.distributed as dist

    rank, local = env_rank(), env_local_rank()
    if str(device).startswith("cuda"):
        backend = "nccl"
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    if rank != 0:  # one voice: rank 0 logs, the others only report errors
        logging.getLogger("edgekd").setLevel(logging.ERROR)
    return Context(rank, world, local, backend), device


def rank_record(ctx, device, images):
    """What one rank did, for metrics.json: proof that every rank ran, and where."""
    return {"rank": ctx.rank, "local_rank": ctx.local_rank, "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(device), "train_images_seen": images}
