"""Command-line flags and the one error path every script shares.

Flags are `--key=value` against a dataclass of defaults, typed by each default's type; the comment
beside each field is its meaning, and `--help` prints every flag with its default and that comment.
Unknown or misspelled keys, malformed arguments, wrong types and a flag given twice are refused.

A user's bad input (a flag, a path, a file's contents) raises BadInput, whose message names the
input and the fix; run() prints it as one line and exits with status 2. Anything else is a bug in
this code and keeps its traceback.
"""

import dataclasses
import difflib
import errno
import inspect
import io
import sys
import textwrap
import tokenize

USAGE_ERROR = 2  # exit status of a refused input, as argparse uses


class BadInput(ValueError):
    """An input that cannot work; the message names it and says what to do instead."""


def meanings(flags_class) -> dict:
    """{field name: the comment on its line} read from the dataclass's source: one line of meaning."""
    names = {f.name for f in dataclasses.fields(flags_class)}
    source = textwrap.dedent(inspect.getsource(flags_class))
    field_at, comment_at = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        line, col = tok.start
        if tok.type == tokenize.NAME and col == 4 and tok.string in names and line not in field_at:
            field_at[line] = tok.string
        elif tok.type == tokenize.COMMENT:
            comment_at[line] = tok.string.lstrip("#").strip()
    return {name: comment_at.get(line, "") for line, name in field_at.items()}


def help_text(flags_class, prog: str, usage: str = "") -> str:
    """Every flag, its default and its meaning, one per line."""
    meaning = meanings(flags_class)
    fields = dataclasses.fields(flags_class)
    flags = [f"--{f.name}={f.default}" for f in fields]
    width = max(map(len, flags))
    return "\n".join([f"usage: python {prog} [--key=value ...]{usage}", "flags (default, meaning):"]
                     + [f"  {flag:<{width}}  {meaning[f.name]}" for flag, f in zip(flags, fields)])


def parse(argv: list, flags_class, prog: str, usage: str = "") -> dict:
    """The flags given, converted to the type of their default. --help prints help_text and exits 0."""
    if any(arg in ("--help", "-h") for arg in argv):
        print(help_text(flags_class, prog, usage))
        raise SystemExit(0)
    defaults = {f.name: f.default for f in dataclasses.fields(flags_class)}
    given = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise BadInput(f"malformed argument {arg!r}; flags are --key=value (python {prog} --help lists them)")
        if key not in defaults:
            close = [k for k in defaults if k.startswith(key)] or difflib.get_close_matches(key, defaults, n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            raise BadInput(f"unknown flag --{key}; {hint}python {prog} --help lists every flag")
        if key in given:
            raise BadInput(f"--{key} is given twice; give it once")
        given[key] = convert(key, value, type(defaults[key]))
    return given


def convert(key: str, value: str, typ):
    if typ is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise BadInput(f"--{key} takes True or False, not {value!r}")
        return value.lower() in ("true", "1")
    try:
        return typ(value)
    except ValueError:
        raise BadInput(f"--{key} takes a {typ.__name__}, not {value!r}") from None


def number_list(key: str, text: str, typ) -> list:
    """A comma list flag such as --contexts=2048,8192, as numbers of type typ."""
    try:
        return [typ(x) for x in text.split(",")]
    except ValueError:
        raise BadInput(f"--{key}={text} must be a comma list of {typ.__name__}s, e.g. --{key}=1,2") from None


def one_line(message: str) -> str:
    return " ".join(message.split())


def run(main, prog: str):
    """main(sys.argv[1:]); a bad input, a missing file or a full disk end in one line on stderr
    and exit status 2. Every other exception is a bug and propagates with its traceback."""
    try:
        main(sys.argv[1:])
    except BadInput as e:
        message = str(e)
    except FileNotFoundError as e:  # ours carry a message; the OS's name the path
        message = str(e) if e.filename is None else f"{e.filename} does not exist; check the path"
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        message = (f"no space left on the device while writing {e.filename or 'a file'}; free some space "
                   "and run again (files written before are unchanged)")
    else:
        return
    print(f"{prog}: {one_line(message)}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)
