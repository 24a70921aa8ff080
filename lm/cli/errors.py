"""Errors as a user of the command lines sees them: a configuration, data, mesh or checkpoint
error is its message (one or two lines naming the key or file, the value and the fix), not a
traceback; a bug (any other exception) keeps its traceback. `--verbose` on the command line
or LM_VERBOSE=1 in the environment shows every traceback.

    install(prog)      sys.excepthook for the process (lm.parallel.distributed wraps it and
                       still tells the peers of a multi-process run)
    message(exc)       the short form of a user error, or None for a bug
"""

from __future__ import annotations

import ast
import os
import re
import sys
import traceback

VERBOSE_ENV = "LM_VERBOSE"
# errors whose message is the whole story: bad values, missing files, a model that does not fit
USER_ERRORS = (ValueError, OSError, MemoryError, FloatingPointError)
USER_ERROR_NAMES = {"NoUsableCheckpointError", "CorruptCheckpointError"}


def verbose(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0") or "--verbose" in argv or "--verbose=true" in argv


def _from_config_dict(tb) -> bool:
    return any("ml_collections" in frame.filename for frame in traceback.extract_tb(tb))


def config_key_message(exc: BaseException, argv: list[str]) -> str:
    """The message of a misspelt config key (ml_collections raises KeyError/AttributeError whose
    argument is "'lrr'\\nDid you mean ...": printed as is, the newline shows as a literal \\n)."""
    arg: object = exc
    while isinstance(arg, BaseException) and arg.args:  # AttributeError(KeyError("'lrr'\nDid you mean ..."))
        arg = arg.args[0]
    text = str(arg)
    for _ in range(2):  # a repr of a repr
        try:
            text = str(ast.literal_eval(text)) if text[:1] in "'\"" else text
        except (ValueError, SyntaxError):
            break
    key, _, hint = text.replace("\\n", "\n").partition("\n")
    key = key.strip("'\"")
    named = re.match(r'Key "([^"]+)" does not exist', key)  # the message of an assignment to a locked config
    key = named.group(1) if named else key
    override = next((a.split("=", 1)[0] for a in argv if re.search(rf"\.{re.escape(key)}(=|$)", a.split("=", 1)[0])),
                    None)
    where = f"the override {override}" if override else f"the key {key!r}"
    fix = (hint.strip() + " ") if hint else ""
    return f"config: {where} names no field of the config. {fix}(every field: configs/base.py, configs/data.py)"


def message(exc: BaseException, tb=None, argv: list[str] | None = None) -> str | None:
    """The one- or two-line text for a user error, None for anything else (a bug)."""
    argv = sys.argv if argv is None else argv
    if isinstance(exc, (KeyError, AttributeError)) and _from_config_dict(tb or exc.__traceback__):
        return config_key_message(exc, argv)
    if isinstance(exc, USER_ERRORS) or type(exc).__name__ in USER_ERROR_NAMES:
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
            text = f"{text}: {exc.filename}"
        return f"{type(exc).__name__}: {text}"
    return None


def install(prog: str, *, verbose_flag: bool = False) -> None:
    """Print user errors as `prog: error: <message>` (exit status 1, as for any uncaught exception).
    verbose_flag: the command line takes --verbose (else only LM_VERBOSE=1 is suggested)."""
    previous = sys.excepthook
    how = f"--verbose or {VERBOSE_ENV}=1" if verbose_flag else f"{VERBOSE_ENV}=1"

    def hook(exc_type, exc, tb):
        text = None if verbose() else message(exc, tb)
        if text is None:
            previous(exc_type, exc, tb)
            return
        sys.stderr.write(f"{prog}: error: {text}\n  (the traceback: rerun with {how})\n")
        sys.stderr.flush()

    sys.excepthook = hook
