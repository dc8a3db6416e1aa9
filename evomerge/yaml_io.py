"""Reading YAML files a user wrote: one clear line naming the file, line and column on a syntax error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import SpecError


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in `path` (`what` names the file's role in messages, e.g. 'spec file')."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("", f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError("", f"{where}: not valid YAML: {problem}") from err
    except UnicodeDecodeError as err:
        raise SpecError("", f"{path}: not a text file ({err.reason})") from err
    if not isinstance(data, dict):
        raise SpecError("", f"{path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def dump_plain_yaml(data: Any) -> str:
    """YAML without anchors or aliases (repeated values written out), readable by any tool."""

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(data, Dumper=_NoAliases, sort_keys=False)
