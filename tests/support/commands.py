"""The README's command table, made from the commands' own parsers: one row per command and
subcommand, every option in its usage, what the help says it does and the environment
variables its help names. ``python -m tests.support.commands`` prints the table; a test
checks that the README holds exactly that."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator

from broker_proxy._cli import _parser as proxy_parser
from consumers._cli import _parser as consume_parser
from producers._cli import _parser as producer_parser
from sealops._cli import _parser as sealstream_parser

__all__ = ["PARSERS", "commands", "env_names", "table"]

#: each command's parser, in the order of the table
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "sealstream": sealstream_parser,
    "sealstream-producer": producer_parser,
    "sealstream-proxy": proxy_parser,
    "sealstream-consume": consume_parser,
}
_ENV = re.compile(r"\b(?:NATS_URL|XDG_CONFIG_HOME|SEALSTREAM_[A-Z0-9_]+)\b")


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction) and a.help != "==SUPPRESS=="
    ]


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands() -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """(the command's words, its parser, its help line) for every command that runs: a
    subcommand that only holds actions (``authorize``) is not one, its actions are."""

    def walk(
        words: str, parser: argparse.ArgumentParser, text: str
    ) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
        sub = _subparsers(parser)
        if sub is None or not sub.required:
            # a default command that may also be named ('sealstream-producer run')
            named = sub is not None and "run" in sub.choices
            yield f"{words} [run]" if named else words, parser, text
        if sub is None:
            return
        helps = {a.dest: a.help or "" for a in sub._choices_actions}
        for name, child in sub.choices.items():
            if name == "run":  # the default command's explicit name: the same options
                continue
            yield from walk(f"{words} {name}", child, helps.get(name, ""))

    for prog, make in PARSERS.items():
        parser = make()
        # "sealstream-producer: run a cluster agent, ... (authorize)." -> what follows the name
        first = (parser.description or "").partition(": ")[2].split(". ")[0]
        yield from walk(prog, parser, " ".join(first.split()).rstrip("."))


def _usage(action: argparse.Action) -> str:
    flag = max(action.option_strings, key=len)
    if action.nargs == 0:
        shown = flag
    else:
        if action.choices:
            metavar = "|".join(map(str, action.choices))
        else:
            metavar = str(action.metavar or flag.lstrip("-").upper().replace("-", "_"))
        shown = f"{flag} {metavar}"
        if action.nargs is None and isinstance(action, argparse._AppendAction):
            shown += " ..."
    return shown if action.required else f"[{shown}]"


def env_names(parser: argparse.ArgumentParser) -> list[str]:
    """The environment variables a command's help names (options and epilog)."""
    texts = [a.help or "" for a in _options(parser)] + [parser.epilog or ""]
    return sorted({name for text in texts for name in _ENV.findall(text)})


def table() -> str:
    rows = ["| command | what it does | environment |", "|---|---|---|"]
    for words, parser, text in commands():
        positional = [
            str(a.metavar or a.dest).upper()
            for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        ]
        usage = " ".join([words, *positional, *(_usage(a) for a in _options(parser))])
        env = ", ".join(f"`{n}`" for n in env_names(parser)) or "-"
        cell = usage.replace("|", "\\|")
        rows.append(f"| `{cell}` | {text.replace('|', '/')} | {env} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
