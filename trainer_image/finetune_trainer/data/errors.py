"""The one error the data package raises for bad data or a bad data configuration."""

from __future__ import annotations


class DataError(ValueError):
    """Unreadable or malformed data, or a data setting that cannot work; retrying cannot help.

    The trainer maps it to the configuration-error exit code, and its message ends up in the job's status,
    so it is always one line naming the file, the record index and the field.
    """
