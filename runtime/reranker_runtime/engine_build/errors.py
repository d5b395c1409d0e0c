"""Build failures: one class per failure kind, each with its own exit code and reason.

The engine-preparation Job's exit code and its termination message (`/dev/termination-log`) are
what the operator shows in the Reranker's status, so every refusal says what is wrong and what to
do. Exit codes (documented in docs/engines.md):

    0   success, or the output was already complete with the same inputs (no-op)
    1   unexpected internal error (a bug; the message carries the exception)
    2   command-line usage error (argparse)
    10  invalid or contradictory build arguments          BuildArgumentError
    11  the checkpoint could not be fetched                  CheckpointFetchError
    12  the checkpoint is not a supported model              CheckpointInvalidError
    13  the quantization is not available for this model     QuantizationUnsupportedError
    14  the GPU does not match --accelerator (or none)       GpuMismatchError
    15  TensorRT-LLM is missing, or conversion/build failed  EngineBuildError
    16  the output directory holds something else            OutputConflictError
"""

from __future__ import annotations


class BuildError(Exception):
    """A build failure with a user-facing message, an exit code and a CamelCase reason."""

    exit_code: int = 1
    reason: str = "InternalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BuildArgumentError(BuildError):
    exit_code = 10
    reason = "InvalidBuildArguments"


class CheckpointFetchError(BuildError):
    exit_code = 11
    reason = "CheckpointFetchFailed"


class CheckpointInvalidError(BuildError):
    exit_code = 12
    reason = "CheckpointUnsupported"


class QuantizationUnsupportedError(BuildError):
    exit_code = 13
    reason = "QuantizationUnsupported"


class GpuMismatchError(BuildError):
    exit_code = 14
    reason = "AcceleratorMismatch"


class EngineBuildError(BuildError):
    exit_code = 15
    reason = "EngineBuildFailed"


class OutputConflictError(BuildError):
    exit_code = 16
    reason = "OutputConflict"
