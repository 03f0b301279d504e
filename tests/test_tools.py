"""The tool registry: the AST calculator against Python's own arithmetic, conversions against hand
values, the schema check against the jsonschema library, and bad calls that come back as errors."""
from __future__ import annotations

import random
import time

import pytest

from tools import (Tool, ToolRegistry, calculator, convert_units, default_registry, lookup,
                   parse_tool_calls, validate_arguments)


def _random_expression(rng: random.Random, depth: int = 0) -> str:
    if depth > 2 or rng.random() < 0.3:
        return str(rng.randint(0, 99999)) if rng.random() < 0.8 else f"{rng.uniform(0, 100):.3f}"
    op = rng.choice(["+", "-", "*", "/", "//", "%"])
    return f"({_random_expression(rng, depth + 1)} {op} {_random_expression(rng, depth + 1)})"


def test_calculator_matches_python_arithmetic():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        expr = _random_expression(rng)
        try:
            want = eval(expr)  # the reference: Python evaluates the same text in the test only
        except ZeroDivisionError:
            assert "division by zero" in default_registry().call(
                "calculator", {"expression": expr}).content
            continue
        got = float(calculator(expr))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), expr
        checked += 1
    assert checked > 250
    assert calculator("48213 * 7391") == str(48213 * 7391)          # exact, big integers
    assert calculator("-(2 ** 10) + 3 ^ 2") == "-1015"              # ^ read as power
    assert calculator("7 / 2") == "3.5"


@pytest.mark.parametrize("expr, error", [
    ("__import__('os')", "unsupported syntax"), ("open('x')", "unsupported syntax"),
    ("a + 1", "unsupported syntax"), ("2 ** 100000", "exponent"), ("10 ** 40", "too large"),
    ("1 / 0", "division by zero"), ("(-8) ** 0.5", "not a real number"), ("1 +", "cannot parse"),
    ("1" * 300, "longer than"),
])
def test_calculator_refuses_what_it_must(expr, error):
    result = default_registry().call("calculator", {"expression": expr})
    assert not result.ok and result.error_kind == "tool_error" and error in result.content
    assert result.valid_call  # the call itself was well formed: the tool said no


def test_unit_conversions_against_hand_values():
    assert convert_units(1, "mi", "km") == "1.609344"
    assert convert_units(5, "ft", "in") == "60"
    assert convert_units(212, "F", "C") == "100"
    assert convert_units(0, "C", "K") == "273.15"
    assert convert_units(2, "lb", "g") == "907.18474"
    assert convert_units(90, "min", "h") == "1.5"
    result = default_registry().call("convert_units", {"value": 3, "from_unit": "kg", "to_unit": "m"})
    assert not result.ok and "cannot convert mass (kg) to length (m)" in result.content
    assert lookup("capital", "kenya") == "Nairobi" and lookup("atomic_number", "Gold") == "79"


def test_bad_calls_are_messages_never_exceptions():
    reg = default_registry()
    cases = [
        ("nope", {}, "unknown_tool", "unknown tool 'nope'"),
        ("calculator", {}, "bad_arguments", "missing required argument 'expression'"),
        ("calculator", {"expression": 3}, "bad_arguments", "expression must be of type string"),
        ("calculator", {"expression": "1", "x": 1}, "bad_arguments", "unknown argument 'x'"),
        ("calculator", ["1"], "bad_arguments", "arguments must be of type object"),
        ("convert_units", {"value": True, "from_unit": "m", "to_unit": "km"},
         "bad_arguments", "value must be of type number"),
        ("convert_units", {"value": 1, "from_unit": "parsec", "to_unit": "km"},
         "tool_error", "unknown unit 'parsec'"),
        ("lookup", {"table": "moons", "key": "Io"}, "bad_arguments", "table must be one of"),
        ("lookup", {"table": "capital", "key": "Atlantis"}, "tool_error", "no entry 'Atlantis'"),
    ]
    for name, args, kind, text in cases:
        r = reg.call(name, args)
        assert (r.ok, r.error_kind) == (False, kind) and text in r.content, (name, args, r)
    assert reg.call("calculator", {"expression": "6*7"}).content == "42"


def test_output_and_time_caps():
    def slow() -> str:
        time.sleep(1.0)
        return "late"

    def chatty() -> str:
        return "x" * 10_000

    def buggy() -> str:
        raise KeyError("oops")

    empty = {"type": "object", "properties": {}}
    reg = ToolRegistry([Tool("slow", "", empty, slow), Tool("chatty", "", empty, chatty),
                        Tool("buggy", "", empty, buggy)], max_output_chars=100, timeout_s=0.05)
    t0 = time.perf_counter()
    r = reg.call("slow", {})
    assert r.error_kind == "timeout" and time.perf_counter() - t0 < 0.5
    r = reg.call("chatty", {})
    assert r.ok and r.content.startswith("x" * 100) and "truncated, 10000 characters" in r.content
    assert len(r.content) < 150
    r = reg.call("buggy", {})
    assert r.error_kind == "tool_error" and "KeyError" in r.content
    with pytest.raises(ValueError, match="registered twice"):
        ToolRegistry([Tool("a", "", empty, slow), Tool("a", "", empty, slow)])


def test_schema_check_agrees_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    values = [{}, {"value": 1, "from_unit": "m", "to_unit": "km"}, {"value": 1.5, "from_unit": "m"},
              {"value": "1", "from_unit": "m", "to_unit": "km"}, {"value": 1, "from_unit": "m",
              "to_unit": "km", "extra": 0}, {"value": None, "from_unit": "m", "to_unit": "x"},
              {"expression": "1+1"}, {"expression": ["1"]}, {"table": "capital", "key": "Peru"},
              {"table": "moons", "key": "x"}, [], "text", {"value": False, "from_unit": "g",
              "to_unit": "kg"}]
    for tool in default_registry().tools:
        for value in values:
            ours = validate_arguments(tool.parameters, value) is None
            theirs = jsonschema.Draft202012Validator(tool.parameters).is_valid(value)
            assert ours == theirs, (tool.name, value)


def test_parse_tool_calls():
    text = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "lookup", "arguments": "{\\"table\\": \\"capital\\", '
            '\\"key\\": \\"Peru\\"}"}\n</tool_call>\n<tool_call>{"name": 3}</tool_call><tool_call>{oops')
    content, calls = parse_tool_calls(text)
    assert content == "Let me compute."
    assert [(c.name, c.arguments) for c in calls[:2]] == [
        ("calculator", {"expression": "2*3"}), ("lookup", {"table": "capital", "key": "Peru"})]
    assert "name" in calls[2].error and "not closed" in calls[3].error
    reg = default_registry()
    assert [reg.run(c).content for c in calls[:2]] == ["6", "Lima"]
    assert reg.run(calls[3]).error_kind == "parse" and not reg.run(calls[3]).valid_call
    assert parse_tool_calls("The answer is 4.") == ("The answer is 4.", [])
