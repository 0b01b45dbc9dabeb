"""YAML files: read safely, with errors that name the file. Option keys live in camcli.options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from camcli.errors import UsageError


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (``*name``, ``<<: *name``) the moment the parser meets one.

    An alias repeats a node by reference, so nine nested levels of them build billions of values
    (a "billion laughs" file) before anything could check the result. No camcli file needs them.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


class _AliasRefused(Exception):
    def __init__(self, anchor: str, line: int) -> None:
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line


def _read_json(text: str, what: str, error: type[UsageError]) -> Any:  # noqa: ANN401
    def refuse(name: str) -> Any:  # noqa: ANN401
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError as e:
        raise error(f"{what}: not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise error(f"{what}: not valid JSON: nested too deeply") from None


def read_yaml(path: Path, what: str, error: type[UsageError] = UsageError) -> Any:  # noqa: ANN401
    """Load a YAML file (a .json file as JSON); a missing, binary or non-UTF-8 file or a syntax error raises ``error`` naming ``what``."""
    if not path.is_file():
        raise error(f"{what}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what}: not a text file (expected UTF-8 YAML)") from None
    except OSError as e:
        raise error(f"{what}: cannot be read ({e.strerror or e})") from None
    if "\x00" in text:
        raise error(f"{what}: not a text file (expected UTF-8 YAML)")
    if path.suffix.lower() == ".json":  # YAML 1.1 reads some JSON otherwise (5e1 is a string there)
        return _read_json(text, what, error)
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    except _AliasRefused as e:
        raise error(f"{what}: line {e.line}: YAML aliases (*{e.anchor[:40]}) are not accepted; "
                    "write the value out where it is used") from None
    except yaml.YAMLError as e:
        raise error(f"{what}: not valid YAML: {str(e).splitlines()[0][:200]}") from None
    finally:
        loader.dispose()
