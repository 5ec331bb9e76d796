"""Command-line flags: `--key=value` against a dict of defaults, typed by each default's type.
Unknown keys, malformed arguments and wrong types stop the program with the valid keys listed."""

import sys


def parse(argv: list, defaults: dict, prog: str) -> dict:
    """Returns only the flags given, converted to the type of their default."""
    given = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in defaults:
            sys.exit(f"{prog}: unknown or malformed flag {arg!r}; use --key=value with key one of: "
                     + ", ".join(defaults))
        given[key] = convert(prog, key, value, type(defaults[key]))
    return given


def convert(prog: str, key: str, value: str, typ):
    if typ is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            sys.exit(f"{prog}: --{key} takes True or False, not {value!r}")
        return value.lower() in ("true", "1")
    try:
        return typ(value)
    except ValueError:
        sys.exit(f"{prog}: --{key} takes a {typ.__name__}, not {value!r}")
