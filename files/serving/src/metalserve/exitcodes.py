"""Process exit codes of the ``metalserve`` command (the Ansible roles rely on them)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # generic failure; consistency: replicas disagree or are unreachable
    USAGE = 2  # bad flags or settings (argparse uses 2 as well)
    VERIFICATION_FAILED = 3  # files missing, extra or not matching the manifest
    VERSION_NOT_FOUND = 4  # unknown or ambiguous version id / prefix
    LOAD_FAILED = 5  # the version verified but could not be loaded or warmed up
    NOT_CACHED = 6  # cache-fill: the version does not fit the node's cache beside what it keeps
    RANK_FAILED = 7  # serve --tensor-parallel: another rank of the replica exited
    API_PROCESS_FAILED = 8  # serve --api-processes: another API process of the replica exited
