"""Data-parallel training: communicators (MPI, NCCL, threads for tests) and gradient averaging.

    mpiexec -n 2 lowrank finetune --base base --variant lora --out run   # auto-detected

Every rank samples the same global batch (same host RNG) and takes its contiguous share of
the rows; the trainer all-reduces the mean gradients right after the backward, so K
processes compute the gradient one process would, and every rank keeps identical parameters
(checked by ``GradientAllReduce.check_drift``). Only rank 0 writes files.

Within one process, ``BatchShards`` splits a batch's rows over threads instead (the CPU's
cores; docs/performance.md#batch-shards).
"""
from .comm import (COMM_KINDS, Comm, MPIComm, NCCLComm, SingleProcess, get_comm,
                   launched_size)
from .fake import FakeComm, FakeWorld
from .ddp import GradientAllReduce, ParameterDriftError
from .shards import BatchShards

__all__ = ["COMM_KINDS", "Comm", "SingleProcess", "MPIComm", "NCCLComm", "FakeComm", "FakeWorld",
           "get_comm", "launched_size", "GradientAllReduce", "ParameterDriftError", "BatchShards"]
