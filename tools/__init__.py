"""Tools a model may call: a registry of plain Python functions with JSON-schema signatures.

Scope: the tools themselves (``calculator``, ``convert_units``, ``lookup``), the registry that
validates a call's arguments and runs it, and ``parse_tool_calls``, which reads the
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks our chat template renders.
Pure Python (standard library only): the synthetic data (``dataset/synthetic.py``), the tool-use
benchmark (``tasks/toolcall.py``) and agent RL all use this one module, so a tool result the model
reads in training is byte for byte the one it reads when measured. It sits below ``dataset/`` and
``tasks/`` (it imports neither), which is why it is a package of its own and not part of tasks/.

Contract: ``ToolRegistry.call(name, arguments)`` never raises for anything the model wrote. A bad
call (unknown tool, arguments that break the schema, a tool that fails or runs too long) comes back
as a ``ToolResult`` with ``ok=False`` and an ``Error: ...`` text that is fed to the model like any
result; ``error_kind`` says which failure it was, for the benchmark's valid-call rate. Output is
capped at ``max_output_chars`` and each call at ``timeout_s`` (a call that overruns is abandoned in
its daemon thread: Python cannot kill a thread, so the tools also bound their own work — the
calculator refuses huge powers and numbers — and the timeout is the backstop).

The calculator evaluates the expression's AST (numbers, + - * / // % **, unary signs, brackets),
never ``eval``. The schema check covers what tool signatures use: ``type`` (object, string, number,
integer, boolean), ``properties``, ``required``, ``enum`` and ``additionalProperties: false``.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Tool", "ToolCall", "ToolResult", "ToolRegistry", "ToolError", "default_registry",
           "calculator", "convert_units", "lookup", "parse_tool_calls", "format_number",
           "validate_arguments", "UNITS", "TABLES"]


class ToolError(Exception):
    """Raised inside a tool for a request it cannot serve; its message goes to the model."""


@dataclass(frozen=True)
class Tool:
    """One callable tool: ``fn(**arguments) -> str`` and its JSON-schema ``parameters``."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., str]

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry (what the chat template lists in the system turn)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One ``<tool_call>`` block as the model wrote it: ``name``/``arguments`` when it parsed,
    else ``error`` (what was wrong) and the raw ``text``."""

    name: str | None
    arguments: dict[str, Any] | None
    text: str
    error: str | None = None


@dataclass(frozen=True)
class ToolResult:
    """What a call gave back: ``content`` for the ``role: tool`` message; ``ok`` False on any
    failure, with ``error_kind`` one of parse | unknown_tool | bad_arguments | tool_error | timeout."""

    content: str
    ok: bool = True
    error_kind: str | None = None

    @property
    def valid_call(self) -> bool:
        """The call itself was well formed (parsable, known tool, schema-valid arguments), even if
        the tool then refused the request (a division by zero is the tool's answer, not a bad call)."""
        return self.error_kind not in ("parse", "unknown_tool", "bad_arguments")


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
    # JSON has one number type; bool is a Python int subclass but not a JSON number.
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "boolean": lambda v: isinstance(v, bool),
}


def validate_arguments(schema: Mapping[str, Any], value: Any, where: str = "arguments") -> str | None:
    """The first way ``value`` breaks ``schema`` as one line, or None when it conforms."""
    kind = schema.get("type")
    if kind is not None:
        if kind not in _TYPES:
            raise ValueError(f"{where}: schema type {kind!r} is not supported")
        if not _TYPES[kind](value):
            return f"{where} must be of type {kind}, got {json.dumps(value)[:40]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(str, schema['enum']))}"
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"missing required argument {key!r}"
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                return f"unknown argument {extra[0]!r} (expected {', '.join(props)})"
        for key, sub in props.items():
            if key in value:
                problem = validate_arguments(sub, value[key], key)
                if problem:
                    return problem
    return None


# ------------------------------------------------------------------------------------------
# The built-in tools
# ------------------------------------------------------------------------------------------

def format_number(x: int | float) -> str:
    """A result as the model reads it: integers exactly, other numbers to 10 significant digits
    without trailing zeros or exponent for everyday sizes (12.5, 0.0254, 1609.344)."""
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return str(int(x))
    text = f"{x:.10g}"
    if "e" in text and 1e-6 <= abs(x) < 1e15:
        text = f"{x:.10f}".rstrip("0").rstrip(".")
    return text


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPR_CHARS = 200
_MAX_ABS = 10 ** 30          # larger intermediate values are refused: output and time stay small
_MAX_EXPONENT = 100


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent {format_number(right)} is too large (at most {_MAX_EXPONENT})")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("result too large") from None
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
    else:
        what = type(node).__name__
        raise ToolError(f"unsupported syntax ({what}); use numbers, + - * / // % ** and brackets")
    if abs(value) > _MAX_ABS:
        raise ToolError("result too large")
    return value


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression by walking its AST (never ``eval``)."""
    if len(expression) > _MAX_EXPR_CHARS:
        raise ToolError(f"expression longer than {_MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"),
                         mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r}") from None
    return format_number(_evaluate(tree))


# unit -> (dimension, factor to the base unit); temperatures are affine and handled apart.
UNITS: dict[str, tuple[str, float]] = {
    "mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0), "km": ("length", 1000.0),
    "in": ("length", 0.0254), "ft": ("length", 0.3048), "yd": ("length", 0.9144),
    "mi": ("length", 1609.344),
    "mg": ("mass", 1e-6), "g": ("mass", 0.001), "kg": ("mass", 1.0), "t": ("mass", 1000.0),
    "oz": ("mass", 0.028349523125), "lb": ("mass", 0.45359237),
    "ml": ("volume", 0.001), "l": ("volume", 1.0), "gal": ("volume", 3.785411784),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "week": ("time", 604800.0),
    "C": ("temperature", 1.0), "F": ("temperature", 1.0), "K": ("temperature", 1.0),
}
_TO_KELVIN = {"C": lambda v: v + 273.15, "F": lambda v: (v - 32) * 5 / 9 + 273.15, "K": lambda v: v}
_FROM_KELVIN = {"C": lambda k: k - 273.15, "F": lambda k: (k - 273.15) * 9 / 5 + 32, "K": lambda k: k}


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (same dimension), 10 significant digits."""
    for unit in (from_unit, to_unit):
        if unit not in UNITS:
            raise ToolError(f"unknown unit {unit!r} (one of {', '.join(UNITS)})")
    (dim_a, fa), (dim_b, fb) = UNITS[from_unit], UNITS[to_unit]
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
    if dim_a == "temperature":
        out = _FROM_KELVIN[to_unit](_TO_KELVIN[from_unit](value))
    else:
        out = value * fa / fb
    return format_number(float(f"{out:.10g}"))


TABLES: dict[str, dict[str, str]] = {
    "capital": {
        "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
        "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Brazil": "Brasilia",
        "Canada": "Ottawa", "Australia": "Canberra", "Kenya": "Nairobi", "Egypt": "Cairo",
        "Peru": "Lima", "Norway": "Oslo", "Poland": "Warsaw", "Chile": "Santiago",
        "Turkey": "Ankara", "Vietnam": "Hanoi", "Ghana": "Accra", "Portugal": "Lisbon",
    },
    "atomic_number": {
        "hydrogen": "1", "helium": "2", "lithium": "3", "carbon": "6", "nitrogen": "7",
        "oxygen": "8", "sodium": "11", "magnesium": "12", "aluminium": "13", "silicon": "14",
        "sulfur": "16", "chlorine": "17", "potassium": "19", "calcium": "20", "iron": "26",
        "copper": "29", "zinc": "30", "silver": "47", "gold": "79", "lead": "82",
    },
}


def lookup(table: str, key: str) -> str:
    """The entry ``key`` of a fixed table (case-insensitive key)."""
    entries = {k.lower(): v for k, v in TABLES[table].items()}
    if key.strip().lower() not in entries:
        raise ToolError(f"no entry {key!r} in table {table!r}")
    return entries[key.strip().lower()]


def _builtin_tools() -> list[Tool]:
    return [
        Tool("calculator", "Evaluate an arithmetic expression (+ - * / // % ** and brackets).",
             {"type": "object", "properties": {"expression": {"type": "string"}},
              "required": ["expression"], "additionalProperties": False}, calculator),
        # The unit lists are checked by the tool, not by an enum: the schema is rendered into
        # every prompt, and two enums of 23 units would double its length.
        Tool("convert_units", "Convert a quantity between units (m, km, mi, ft, in, kg, g, lb, "
                              "oz, l, ml, gal, s, min, h, C, F, K, ...).",
             {"type": "object", "properties": {"value": {"type": "number"},
                                               "from_unit": {"type": "string"},
                                               "to_unit": {"type": "string"}},
              "required": ["value", "from_unit", "to_unit"], "additionalProperties": False},
             convert_units),
        Tool("lookup", "Look a key up in a table: capital (of a country) or atomic_number (of an "
                       "element).",
             {"type": "object", "properties": {"table": {"type": "string", "enum": list(TABLES)},
                                               "key": {"type": "string"}},
              "required": ["table", "key"], "additionalProperties": False}, lookup),
    ]


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------

@dataclass
class ToolRegistry:
    """Tools by name, with the caps every call runs under."""

    tools: Iterable[Tool] = ()
    max_output_chars: int = 512
    timeout_s: float = 2.0
    _by_name: dict[str, Tool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {}
        for tool in self.tools:
            if tool.name in self._by_name:
                raise ValueError(f"tool {tool.name!r} registered twice")
            self._by_name[tool.name] = tool
        self.tools = tuple(self._by_name.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def schemas(self) -> list[dict[str, Any]]:
        """The ``tools`` list of a request or an SFT record."""
        return [t.schema() for t in self.tools]

    def check(self, name: str | None, arguments: Any) -> ToolResult | None:
        """The error result of a malformed call (unknown tool, bad arguments), or None if valid."""
        if name not in self._by_name:
            return ToolResult(f"Error: unknown tool {name!r} (available: {', '.join(self.names)})",
                              False, "unknown_tool")
        problem = validate_arguments(self._by_name[name].parameters, arguments)
        if problem:
            return ToolResult(f"Error: {name}: {problem}", False, "bad_arguments")
        return None

    def call(self, name: str | None, arguments: Any) -> ToolResult:
        """Run one call under the caps; every failure is a result, never an exception."""
        bad = self.check(name, arguments)
        if bad is not None:
            return bad
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["out"] = str(self._by_name[name].fn(**arguments))
            except ToolError as e:
                box["err"] = str(e)
            except Exception as e:  # a tool bug must not stop a training run either
                box["err"] = f"{type(e).__name__}: {e}"

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            return ToolResult(f"Error: {name} took longer than {self.timeout_s:g} s", False, "timeout")
        if "err" in box:
            return ToolResult(self._cap(f"Error: {name}: {box['err']}"), False, "tool_error")
        return ToolResult(self._cap(box["out"]))

    def run(self, call: ToolCall) -> ToolResult:
        """``call`` for a parsed block; a block that did not parse is a ``parse`` error."""
        if call.error is not None:
            return ToolResult(f"Error: {call.error}", False, "parse")
        return self.call(call.name, call.arguments)

    def _cap(self, text: str) -> str:
        if len(text) <= self.max_output_chars:
            return text
        return text[: self.max_output_chars] + f"... [truncated, {len(text)} characters]"


def tool_names(spec: str) -> list[str]:
    """A ``--tools`` value: comma-separated built-in tool names; 'none' is the empty list."""
    return [] if spec.strip() == "none" else [t.strip() for t in spec.split(",") if t.strip()]


def default_registry(names: Iterable[str] | None = None, **caps: Any) -> ToolRegistry:
    """The built-in tools (calculator, convert_units, lookup), or those of them in ``names``;
    ``caps`` go to ``ToolRegistry``. The full list renders to ~720 tokens of prompt with the
    shipped tokenizer (JSON is expensive in a 6400-token vocabulary): a model needs a context of
    1024 or more for it; the calculator alone is ~260."""
    tools = _builtin_tools()
    if names is not None:
        wanted = list(names)
        unknown = sorted(set(wanted) - {t.name for t in tools})
        if unknown:
            raise ValueError(f"unknown built-in tool {unknown[0]!r} (one of "
                             f"{', '.join(t.name for t in tools)})")
        tools = [t for t in tools if t.name in wanted]
    return ToolRegistry(tools, **caps)


# ------------------------------------------------------------------------------------------
# Reading calls out of generated text
# ------------------------------------------------------------------------------------------

_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of an assistant text: the text before the first ``<tool_call>``
    (stripped) and every block in order. A block whose body is not a JSON object with a string
    ``name`` and object ``arguments`` (or is left unclosed) is a ``ToolCall`` with ``error`` set."""
    first = text.find("<tool_call>")
    content = (text if first < 0 else text[:first]).strip()
    calls = []
    for m in _CALL_RE.finditer(text):
        body = m.group(1).strip()
        if not m.group(0).endswith("</tool_call>"):
            calls.append(ToolCall(None, None, body, "the <tool_call> block is not closed"))
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, None, body, f"the tool call is not valid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(None, None, body, 'a tool call needs {"name": ..., "arguments": {...}}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], None, body, "the tool call's arguments must be an object"))
            continue
        calls.append(ToolCall(obj["name"], args, body))
    return content, calls
