"""MATH answer extraction, normalisation and equivalence (pure Python, no sympy).

Scope: find the final answer of a MATH-style solution (the last ``\\boxed{...}``), bring LaTeX
answers to a canonical string, and decide whether two answers are the same. ``tasks.math`` scores
with ``score_math`` and reads golds with ``extract_boxed``.

References:
- MATH (Hendrycks et al., 2021, https://github.com/hendrycks/math): answers are the contents of the
  last ``\\boxed{}`` / ``\\fbox{}``; its scorer compares strings after a fixed list of clean-ups
  (``\\dfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, units, ``\\%``, ``^\\circ``, ...).
- PRM800K / "Let's Verify Step by Step" grader and Minerva's normaliser go further with a
  symbolic check; sympy is not a dependency here, so equivalence falls back to a small LaTeX
  expression evaluator written below (numbers, ``\\frac``, ``\\sqrt``, powers, ``\\pi``,
  trig/log, implicit multiplication, free variables checked at fixed sample points).

How ``math_equiv`` decides, in order (each step recurses into parts with ``math_equiv``):
1. equal normalised strings;
2. matrices: same shape, entries equivalent;
3. bracketed tuples / intervals: same brackets, same length, elements equivalent in order;
   sets ``\\{...\\}`` and bare comma lists (``"Enter all solutions"``): equivalent as multisets;
4. unions ``A \\cup B``: parts in order; equations ``lhs = rhs``: same lhs text, rhs equivalent;
5. both parse as expressions with the same free variables and agree (relative 1e-6) at every
   sample point (a numeric check, so ``0.5`` == ``\\frac{1}{2}`` and ``2x+1`` == ``1+2x``);
6. plain words compared case-insensitively.
Known gaps: ``\\pm`` answers, inequalities, answers that need algebraic simplification beyond
numeric agreement at sample points on a real domain (e.g. branch cuts), degrees vs radians.
"""
from __future__ import annotations

import math
import re
from typing import Callable

__all__ = [
    "extract_boxed",
    "extract_math_prediction",
    "normalize_math_answer",
    "math_equiv",
    "score_math",
    "latex_to_number",
]

REL_TOL = 1e-6

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _balanced_group(text: str, start: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``start``; None when it never closes.

    Escaped braces (``\\{``, ``\\}``, used for sets) do not count as grouping.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str | None) -> str | None:
    """Contents of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (nested braces kept).

    Also accepts the brace-less form ``\\boxed 5`` (the argument runs to the next ``$`` or line
    end). Returns None when there is no box or its braces never close (a truncated generation).
    """
    if not text:
        return None
    matches = list(_BOX_CMD_RE.finditer(text))
    # Only the last box counts: if it is broken (truncated output) we report no answer rather than
    # silently scoring an earlier, intermediate box.
    if not matches:
        return None
    m = matches[-1]
    i = m.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _balanced_group(text, i)
        if end is None:
            return None
        return text[i + 1:end - 1].strip()
    if i == m.end():  # "\boxed" directly followed by something that is neither space nor brace
        return None
    rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
    return rest.rstrip(".").strip() or None


_ANSWER_PHRASE_RE = re.compile(
    r"(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)",
    re.IGNORECASE,
)


def extract_math_prediction(text: str | None) -> str | None:
    """Final answer of a model completion: the last box, else "The (final) answer is X".

    The phrase fallback keeps small models that never learnt ``\\boxed`` from scoring zero; the
    captured text is stripped of surrounding ``$``.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    if not text:
        return None
    found = _ANSWER_PHRASE_RE.findall(text)
    if not found:
        return None
    ans = found[-1].strip().strip("$").strip()
    return ans or None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

# Unit words removed after a number ("5 cm", "12 square units"). Kept short on purpose: a word such
# as "even" or "Devon" is an answer, not a unit.
_UNIT_WORDS = (
    r"units?|square\s*units?|sq\.?\s*units?|cubic\s*units?|cm|centimeters?|m|meters?|km|"
    r"kilometers?|mm|inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mph|degrees?|dollars?|cents?|"
    r"hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|pounds?|lbs?|ounces?|"
    r"oz|grams?|g|kg|liters?|ml|gallons?|people|students|ways|cookies|marbles"
)
# The value before the unit must look numeric and a space must separate them, so "x+2m" or "3n"
# (variables) are never truncated.
_TRAILING_UNIT_RE = re.compile(
    r"^((?:[-+\d.,{}^]|\\frac|\\sqrt|\\pi)*\d[}]?)\s+(?:" + _UNIT_WORDS
    + r")(?:\^\{?[23]\}?)?$",
    re.IGNORECASE,
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|textnormal|operatorname)\s*\{")
# The lookbehind keeps the row break "\\ " of a matrix from being read as a "\ " space.
_SPACING_RE = re.compile(r"(?<!\\)\\[!,;:> ]|~|\\quad|\\qquad")
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![A-Za-z])")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ASSIGN_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*(?=\S)")
_CHOICE_RE = re.compile(r"^\(?([A-E])\)?$")
_MIXED_RE = re.compile(r"^(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")
_PLAIN_FRAC_RE = re.compile(r"^(-?)(\d+)/(\d+)$")


def _unwrap_text(s: str) -> str:
    """Replace ``\\text{X}`` (and friends) by ``X``, keeping nested braces of X intact."""
    while True:
        m = _TEXT_CMD_RE.search(s)
        if not m:
            return s
        open_idx = m.end() - 1
        end = _balanced_group(s, open_idx)
        if end is None:  # unclosed: drop the command name only
            return s[:m.start()] + s[open_idx + 1:]
        s = s[:m.start()] + s[open_idx + 1:end - 1] + s[end:]


def _strip_trailing_text_unit(s: str) -> str:
    """Drop a final ``\\text{...}`` (optionally ``^2``) after a value: ``5\\text{ cm}^2`` -> ``5``.

    Only when something precedes it; a whole answer like ``\\text{even}`` is kept (unwrapped later).
    """
    m = re.search(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$", s)
    if m and s[:m.start()].strip() and re.search(r"[\d}).]\s*$", s[:m.start()]):
        return s[:m.start()].rstrip()
    return s


def _brace_args(s: str) -> str:
    """Give every ``\\frac``/``\\sqrt``/``\\binom`` argument braces: ``\\frac12`` -> ``\\frac{1}{2}``.

    LaTeX lets single-token arguments go without braces; the evaluator and string comparison
    want one canonical spelling. ``\\sqrt[3]{x}`` keeps its optional index.
    """
    out: list[str] = []
    i = 0
    n = len(s)
    cmd_re = re.compile(r"\\(frac|sqrt|binom)(?![A-Za-z])")
    while i < n:
        m = cmd_re.match(s, i)
        if not m:
            out.append(s[i])
            i += 1
            continue
        name = m.group(1)
        out.append("\\" + name)
        i = m.end()
        if name == "sqrt":
            j = i
            while j < n and s[j] == " ":
                j += 1
            if j < n and s[j] == "[":
                close = s.find("]", j)
                if close < 0:
                    out.append(s[i:])
                    return "".join(out)
                out.append("[" + _brace_args(s[j + 1:close]) + "]")
                i = close + 1
        for _ in range(1 if name == "sqrt" else 2):
            while i < n and s[i] == " ":
                i += 1
            if i >= n or s[i] in "}])":  # no argument here (malformed input): leave as is
                break
            if s[i] == "{":
                end = _balanced_group(s, i)
                if end is None:
                    out.append(s[i:])
                    return "".join(out)
                out.append("{" + _brace_args(s[i + 1:end - 1]) + "}")
                i = end
            elif s[i] == "\\":
                cm = re.match(r"\\[A-Za-z]+|\\.", s[i:], re.S)
                arg = cm.group(0) if cm else "\\"  # a lone trailing backslash
                out.append("{" + arg + "}")
                i += len(arg)
            else:
                out.append("{" + s[i] + "}")
                i += 1
    return "".join(out)


def _remove_spaces(s: str) -> str:
    """Remove whitespace except where it ends a command name (``\\pi r`` must not become ``\\pir``)."""
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
    s = re.sub(r"\s+", "", s)
    return s.replace("\x00", " ")


def normalize_math_answer(s: str | None) -> str:
    """Canonical string form of a MATH answer; ``None`` becomes ``""``.

    Removes presentation-only differences: ``$``/``\\(...\\)`` wrappers, ``\\left``/``\\right``,
    LaTeX spacing (``\\!``, ``\\,``), ``\\dfrac``/``\\tfrac``, brace-less ``\\frac12``/``\\sqrt2``,
    degree marks, ``\\%``/``%``, ``\\$``, trailing units (``\\text{ cm}``, "5 inches"), other
    ``\\text{}`` wrappers, a leading ``x =`` / ``x \\in``, thousands separators, a trailing ``.``,
    ``(A)`` -> ``A``, ``.5`` -> ``0.5``, ``a/b`` -> ``\\frac{a}{b}``, mixed numbers
    ``2\\frac{1}{2}`` -> ``\\frac{5}{2}``, and all insignificant whitespace.
    Idempotent on every MATH answer (tested); malformed LaTeX may need a second pass.
    """
    if s is None:
        return ""
    s = str(s).strip()
    # Math-mode wrappers around the whole answer.
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = s.replace("\n", " ")
    s = _SPACING_RE.sub(" ", s)
    s = _SIZING_RE.sub("", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:leq|leqslant)(?![A-Za-z])", r"\\le", s)
    s = re.sub(r"\\(?:geq|geqslant)(?![A-Za-z])", r"\\ge", s)
    s = re.sub(r"\\neq(?![A-Za-z])", r"\\ne", s)
    s = re.sub(r"\\varnothing(?![A-Za-z])", r"\\emptyset", s)
    s = s.strip()
    # Trailing sentence punctuation ("5." at the end of a sentence), but not a decimal point.
    s = re.sub(r"(?:\\?\.|,|\s)+$", "", s)
    s = _strip_trailing_text_unit(s)
    s = _unwrap_text(s)
    s = s.strip()
    m = _TRAILING_UNIT_RE.match(s)
    if m:
        s = m.group(1).strip()
    s = _ASSIGN_RE.sub("", s) if s.count("=") <= 1 else s
    s = _brace_args(s)
    s = _remove_spaces(s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    m = _CHOICE_RE.match(s)
    if m:
        s = m.group(1)
    m = _PLAIN_FRAC_RE.match(s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    m = _MIXED_RE.match(s)
    if m:
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        s = f"{m.group(1)}\\frac{{{whole * den + num}}}{{{den}}}"
    s = re.sub(r"\.$", "", s)
    return s


# --------------------------------------------------------------------------------------------
# A small LaTeX expression evaluator
# --------------------------------------------------------------------------------------------


class _ParseError(ValueError):
    pass


_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
    "chi", "psi", "omega",
}
_FUNCS: dict[str, Callable[[float], float]] = {
    "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "sec": lambda x: 1 / math.cos(x), "csc": lambda x: 1 / math.sin(x),
    "cot": lambda x: 1 / math.tan(x),
    "arcsin": math.asin, "arccos": math.acos, "arctan": math.atan,
    "ln": math.log, "exp": math.exp,
}
_TOKEN_RE = re.compile(
    r"\s+"
    r"|(?P<num>\d+(?:\.\d*)?|\.\d+)"
    r"|(?P<var>[A-Za-z](?:_(?:\{[A-Za-z0-9]+\}|[A-Za-z0-9]))?)"
    r"|(?P<cmd>\\[A-Za-z]+)"
    r"|(?P<op>\\\{|\\\}|[-+*/^()\[\]{}!|_,])"
)


def _tokenize(s: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m:
            raise _ParseError(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind is None:
            continue  # whitespace
        value = m.group(kind)
        if kind == "cmd":
            name = value[1:]
            if name in _GREEK:
                kind, value = "var", name
            else:
                value = name
        elif kind == "var":
            value = value.replace("{", "").replace("}", "")
        tokens.append((kind, value))
    return tokens


# AST nodes are tuples: ("num", v) ("var", name) ("neg", a) ("add"|"sub"|"mul"|"div"|"pow", a, b)
# ("fn", name, a) ("fact", a) ("abs", a) ("floor", a) ("ceil", a) ("binom", a, b) ("root", n, a)
_Node = tuple


class _Parser:
    """Recursive-descent parser for the arithmetic subset of LaTeX that MATH answers use."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.toks = tokens
        self.i = 0
        self.abs_depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise _ParseError("unexpected end")
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        tok = self.take()
        if tok[1] != value:
            raise _ParseError(f"expected {value!r}, got {tok[1]!r}")

    def parse(self) -> _Node:
        node = self.expr()
        if self.peek() is not None:
            raise _ParseError(f"trailing token {self.peek()!r}")
        return node

    def expr(self) -> _Node:
        node = self.term()
        while (tok := self.peek()) is not None and tok in (("op", "+"), ("op", "-")):
            self.take()
            node = ("add" if tok[1] == "+" else "sub", node, self.term())
        return node

    def _starts_atom(self, tok: tuple[str, str] | None) -> bool:
        if tok is None:
            return False
        kind, value = tok
        if kind in ("num", "var"):
            return True
        if kind == "op":
            return value in ("(", "{", "[") or (value == "|" and self.abs_depth == 0)
        return value in ("frac", "sqrt", "binom", "pi", "infty", "lfloor", "lceil") or value in _FUNCS \
            or value == "log"

    def term(self) -> _Node:
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in (("op", "*"), ("cmd", "cdot"), ("cmd", "times")):
                self.take()
                node = ("mul", node, self.unary())
            elif tok in (("op", "/"), ("cmd", "div")):
                self.take()
                node = ("div", node, self.unary())
            elif self._starts_atom(tok):
                # Implicit multiplication ("2x", "3\sqrt{2}", "(a+b)(a-b)"); no unary sign here so
                # that "2-3" stays a subtraction.
                node = ("mul", node, self.power())
            else:
                return node

    def unary(self) -> _Node:
        tok = self.peek()
        if tok == ("op", "-"):
            self.take()
            return ("neg", self.unary())
        if tok == ("op", "+"):
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> _Node:
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            exp = self.exponent()
            return ("pow", base, exp)
        return base

    def exponent(self) -> _Node:
        tok = self.peek()
        if tok == ("op", "{"):
            return self.group("{", "}")
        if tok == ("op", "-"):
            self.take()
            return ("neg", self.postfix())
        return self.postfix()

    def postfix(self) -> _Node:
        node = self.atom()
        while self.peek() == ("op", "!"):
            self.take()
            node = ("fact", node)
        return node

    def group(self, open_: str, close: str) -> _Node:
        self.expect(open_)
        node = self.expr()
        self.expect(close)
        return node

    def atom(self) -> _Node:
        kind, value = self.take()
        if kind == "num":
            return ("num", float(value))
        if kind == "var":
            return ("var", value)
        if kind == "op":
            if value in ("(", "[", "{"):
                node = self.expr()
                close = self.take()[1]
                # "(" may be closed by "]" only in intervals, which never reach this parser
                if close != {"(": ")", "[": "]", "{": "}"}[value]:
                    raise _ParseError("mismatched bracket")
                return node
            if value == "|":
                self.abs_depth += 1
                node = self.expr()
                self.abs_depth -= 1
                self.expect("|")
                return ("abs", node)
            raise _ParseError(f"unexpected {value!r}")
        # commands
        if value == "frac":
            return ("div", self.group("{", "}"), self.group("{", "}"))
        if value == "binom":
            return ("binom", self.group("{", "}"), self.group("{", "}"))
        if value == "sqrt":
            if self.peek() == ("op", "["):
                index = self.group("[", "]")
                return ("root", index, self.group("{", "}"))
            return ("root", ("num", 2.0), self.group("{", "}"))
        if value == "pi":
            return ("num", math.pi)
        if value == "infty":
            return ("num", math.inf)
        if value in ("lfloor", "lceil"):
            node = self.expr()
            self.expect("rfloor" if value == "lfloor" else "rceil")
            return ("floor" if value == "lfloor" else "ceil", node)
        if value in _FUNCS or value == "log":
            base: _Node | None = None
            if value == "log" and self.peek() == ("op", "_"):
                self.take()
                tok = self.peek()
                if tok is not None and tok[0] == "num" and len(tok[1]) > 1:
                    # LaTeX reads "\log_28" as log base 2 of 8 (a brace-less subscript is one
                    # character); normalisation removed the space that made this visible.
                    self.toks[self.i] = ("num", tok[1][1:])
                    base = ("num", float(tok[1][0]))
                else:
                    base = self.group("{", "}") if self.peek() == ("op", "{") else self.atom()
            power: _Node | None = None
            if self.peek() == ("op", "^"):  # \sin^2 x
                self.take()
                power = self.exponent()
            arg = self.power()
            node: _Node = ("log", base, arg) if value == "log" else ("fn", value, arg)
            return ("pow", node, power) if power is not None else node
        raise _ParseError(f"unsupported command \\{value}")


def _evaluate(node: _Node, env: dict[str, float]) -> float:
    op = node[0]
    if op == "num":
        return node[1]
    if op == "var":
        return env[node[1]]
    if op == "neg":
        return -_evaluate(node[1], env)
    if op in ("add", "sub", "mul", "div", "pow", "binom", "root"):
        a = _evaluate(node[1], env)
        b = _evaluate(node[2], env)
        if op == "add":
            return a + b
        if op == "sub":
            return a - b
        if op == "mul":
            return a * b
        if op == "div":
            return a / b
        if op == "pow":
            result = a ** b
            if isinstance(result, complex):
                raise ValueError("complex power")
            return float(result)
        if op == "binom":
            if a != int(a) or b != int(b):
                raise ValueError("non-integer binomial")
            return float(math.comb(int(a), int(b)))
        # root: index a, radicand b; odd roots of negatives are real
        if b < 0 and a == int(a) and int(a) % 2 == 1:
            return -((-b) ** (1.0 / a))
        if b < 0:
            raise ValueError("even root of a negative number")
        return b ** (1.0 / a)
    if op == "fact":
        a = _evaluate(node[1], env)
        if a != int(a) or a < 0 or a > 170:
            raise ValueError("bad factorial")
        return float(math.factorial(int(a)))
    if op == "abs":
        return abs(_evaluate(node[1], env))
    if op == "floor":
        return float(math.floor(_evaluate(node[1], env)))
    if op == "ceil":
        return float(math.ceil(_evaluate(node[1], env)))
    if op == "fn":
        return _FUNCS[node[1]](_evaluate(node[2], env))
    if op == "log":
        arg = _evaluate(node[2], env)
        base = 10.0 if node[1] is None else _evaluate(node[1], env)
        return math.log(arg, base)
    raise ValueError(f"unknown node {op}")


def _free_vars(node: _Node) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    out: set[str] = set()
    for child in node[1:]:
        if isinstance(child, tuple):
            out |= _free_vars(child)
    return out


def _parse(s: str) -> _Node:
    return _Parser(_tokenize(s)).parse()


def latex_to_number(s: str) -> float | None:
    """Value of a constant LaTeX expression (``\\frac{\\sqrt{3}}{2}``, ``2\\pi``, ``10\\%``) or None."""
    try:
        node = _parse(normalize_math_answer(s))
        if _free_vars(node):
            return None
        return _evaluate(node, {})
    except (ValueError, ZeroDivisionError, OverflowError, KeyError, RecursionError):
        return None


def _close(a: float, b: float, rel_tol: float = REL_TOL) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rel_tol * max(abs(a), abs(b)) or abs(a - b) <= 1e-12


# Sample points for free variables: irrational-ish, away from 0, ±1 and small integers so that
# distinct polynomials / rational functions almost never agree on all of them.
_SAMPLES = (0.5377, 1.8339, 2.2588, 0.8622, 1.3188, 3.0715)


def _expr_equiv(x: str, y: str) -> bool:
    try:
        nx, ny = _parse(x), _parse(y)
    except (_ParseError, ValueError, RecursionError):
        return False
    vars_x, vars_y = _free_vars(nx), _free_vars(ny)
    if vars_x != vars_y:
        return False
    names = sorted(vars_x)
    trials = 1 if not names else len(_SAMPLES)
    agreed = 0
    for t in range(trials):
        # Different variables get different values (shifted index) so x-y is not identically 0.
        env = {v: _SAMPLES[(t + 2 * k) % len(_SAMPLES)] + 0.1 * k for k, v in enumerate(names)}
        try:
            a, b = _evaluate(nx, env), _evaluate(ny, env)
        except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
            continue  # outside the domain at this point; other points decide
        if math.isnan(a) or math.isnan(b):
            continue
        if not _close(a, b):
            return False
        agreed += 1
    return agreed >= (1 if not names else 2)


# --------------------------------------------------------------------------------------------
# Structure: tuples, intervals, sets, matrices, equations
# --------------------------------------------------------------------------------------------

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {")", "]", "}"}


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside any bracket (``\\{``/``\\}`` count as brackets)."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        ch = s[i]
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _outer_brackets(s: str) -> tuple[str, str, str] | None:
    """``(open, inner, close)`` when the whole string is one bracketed group, else None.

    ``(a+b)(a-b)`` is two groups and returns None; ``(1,2]`` is an interval and is accepted.
    """
    if s.startswith("\\{") and s.endswith("\\}"):
        open_, close, inner = "\\{", "\\}", s[2:-2]
    elif s[:1] in ("(", "[") and s[-1:] in (")", "]"):
        open_, close, inner = s[0], s[-1], s[1:-1]
    else:
        return None
    depth = 0
    i = 0
    while i < len(inner):
        if inner.startswith("\\{", i) or inner.startswith("\\}", i):
            depth += 1 if inner[i + 1] == "{" else -1
            i += 2
            if depth < 0:
                return None
            continue
        if inner[i] in _OPEN:
            depth += 1
        elif inner[i] in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
        i += 1
    return (open_, inner, close) if depth == 0 else None


_MATRIX_RE = re.compile(r"^\\begin\{([pbvB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.S)


def _matrix_cells(s: str) -> list[list[str]] | None:
    m = _MATRIX_RE.match(s)
    if not m:
        return None
    rows = [r for r in m.group(2).split("\\\\")]
    cells = [[c.strip() for c in r.split("&")] for r in rows]
    return [row for row in cells if any(c for c in row)]


def _multiset_equiv(xs: list[str], ys: list[str]) -> bool:
    if len(xs) != len(ys):
        return False
    unused = list(ys)
    for x in xs:
        for j, y in enumerate(unused):
            if math_equiv(x, y):
                del unused[j]
                break
        else:
            return False
    return True


def math_equiv(a: str | None, b: str | None) -> bool:
    """True when two MATH answers denote the same value (see the module docstring for the rules).

    Symmetric; ``None`` (no answer) is never equivalent to anything.
    """
    if a is None or b is None:
        return False
    x, y = normalize_math_answer(a), normalize_math_answer(b)
    if x == y:
        return x != ""
    if not x or not y:
        return False
    return _equiv_normalized(x, y)


def _equiv_normalized(x: str, y: str) -> bool:
    # Matrices / column vectors.
    mx, my = _matrix_cells(x), _matrix_cells(y)
    if mx is not None or my is not None:
        if mx is None or my is None or [len(r) for r in mx] != [len(r) for r in my]:
            return False
        return all(math_equiv(p, q) for rx, ry in zip(mx, my) for p, q in zip(rx, ry))

    # Unions of intervals / sets: compare part by part in order.
    ux, uy = _split_top(x, "\\cup"), _split_top(y, "\\cup")
    if len(ux) > 1 or len(uy) > 1:
        return len(ux) == len(uy) and all(math_equiv(p, q) for p, q in zip(ux, uy))

    # Bracketed groups: tuples, intervals, sets.
    bx, by = _outer_brackets(x), _outer_brackets(y)
    if bx is not None and by is not None:
        px, py = _split_top(bx[1], ","), _split_top(by[1], ",")
        if len(px) > 1 or len(py) > 1 or bx[0] == "\\{" or by[0] == "\\{":
            if bx[0] == "\\{" and by[0] == "\\{":
                return _multiset_equiv(px, py)
            if (bx[0], bx[2]) != (by[0], by[2]):
                return False  # (1,2) vs [1,2]: open and closed intervals differ
            return len(px) == len(py) and all(math_equiv(p, q) for p, q in zip(px, py))

    # Bare comma lists ("Enter all the solutions, separated by commas"): order does not matter.
    px, py = _split_top(x, ","), _split_top(y, ",")
    if len(px) > 1 or len(py) > 1:
        return _multiset_equiv(px, py)

    # Equations: same left-hand side text, equivalent right-hand sides.
    ex, ey = _split_top(x, "="), _split_top(y, "=")
    if len(ex) == 2 and len(ey) == 2:
        return ex[0] == ey[0] and math_equiv(ex[1], ey[1])
    if len(ex) > 1 or len(ey) > 1:
        return False

    # Words ("even", "Devon"): case-insensitive, and never through the evaluator, which would read
    # a word as a product of single-letter variables (so "no" and "on" would agree).
    word = re.compile(r"[A-Za-z ]{2,}")
    if word.fullmatch(x) or word.fullmatch(y):
        return x.lower().replace(" ", "") == y.lower().replace(" ", "")
    return _expr_equiv(x, y)


def score_math(pred_text: str | None, gold_answer: str) -> dict:
    """Score one completion; returns ``{"extracted", "gold", "correct", "error_kind"}``.

    ``error_kind``: None when correct, ``"no_answer"`` when nothing could be extracted,
    ``"wrong_answer"`` otherwise. Plugs into ``evaluation.report``.
    """
    extracted = extract_math_prediction(pred_text)
    if extracted is None:
        return {"extracted": None, "gold": gold_answer, "correct": False, "error_kind": "no_answer"}
    ok = math_equiv(extracted, gold_answer)
    return {"extracted": extracted, "gold": gold_answer, "correct": ok,
            "error_kind": None if ok else "wrong_answer"}
