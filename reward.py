"""Eq. 4, the reward: R(tau) = 1.0 if the completion's final answer equals the gold answer, else 0.0.

reward(completion, answer) applies the rules below (checker="hapo"); checker="math_verify" asks the
math-verify package instead, as published numbers were scored (symbolic.check_checker). The table of
what counts as correct, the measured speed and agreement, and the known gaps: docs/REWARD.md.
- The prediction is the content of the *last* `\\boxed{...}`; none, an empty or an unclosed one scores 0.
- Both sides are normalised; latex.py reads other spellings (`{a \\over b}`, `½`, an array in brackets
  as a matrix). A different unit is wrong (`20 m` for `20 cm`); a missing one is not.
- Numbers compare exactly without sympy, scientific notation too (`3.2e4`, `3.2 \\times 10^{4}`); `50\\%`
  is 50 or 0.5, but `0.15\\%` is not `15\\%`. `\\gcd`, `\\operatorname{lcm}`, `\\max`, `\\min`, `a \\bmod b`
  are evaluated when their arguments are numbers, factorials, binomials and floors within the size bound.
- A gold letter A-E is multiple choice: `C`, `(C)`, `\\textbf{(C) }12` name C, but `2C` or `C^2` name none.
- An inequality is an interval however it is written (`3 > x` is `x < 3`), never a bare number.
- Tuples and intervals compare element-wise; sets, lists (`,`, `;`, `or`, `\\quad`) and `a \\pm b` as sets
  of solutions (any order, a repeat counting once); set notation (`\\mathbb{R}\\setminus\\{0\\}`, unions
  that merge) as sets of reals.
- With `=`: a label goes (`x = 3`, `f(2) = 5`, a gold `(p,q) = (3,2)`); every value of a chain must
  equal the gold (`\\frac38 = 0.375`); two equations are equal up to rearrangement or a nonzero factor.
- Anything else goes to sympy: equal when the difference is 0, exactly or to 25 digits at a few
  rational points. A gold decimal with 2+ places (`1.41`) was rounded, so it also accepts an answer no
  finite decimal can equal (`\\sqrt{2}`) that rounds to it.

Sympy runs in persistent child processes with a hard deadline (TIME_BUDGET per call; symbolic.py), so a
call returns in about a second from any thread; what is too large to evaluate is refused first.
`python reward.py` times a step's worth of completions (LUFFY's 128 prompts x 8).
"""
import re, time
from fractions import Fraction

from lib.latex import (_GREEK, _TEXT, brace_group, interval, names, over_to_frac, scientific, set_source,
                   split_top, to_python, unicode_tex, units, unnest)
from lib.symbolic import (CHECKERS, STARTUP_TIMEOUT, Deadline, check_checker, math_verify_equal, sympy_equal,  # noqa: F401
                      terminates, warm_spare)

TIME_BUDGET = 1.0  # seconds of sympy work per reward() call
MAX_LEN = 1000  # longer answers are compared as strings only: no real answer is this long

# ---------------------------------------------------------------------------- extraction


def extract_boxed(text):
    """Content of the last \\boxed{...}, \\fbox{...} or \\boxed 5 in text; None if absent, empty or unclosed."""
    if not isinstance(text, str):
        return None
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    k = j + len(text[j:j + 100]) - len(text[j:j + 100].lstrip())  # \boxed {5}, \boxed 5
    if text[k:k + 1] == "{":
        content = (brace_group(text, k) or ("",))[0]
    else:
        m = re.match(r"[^\s$]+", text[k:k + MAX_LEN]) if k > j else None
        content = m.group() if m else ""
    return content.strip() or None


# ---------------------------------------------------------------------------- normalisation

_REPLACE = [  # substring -> replacement, in this order
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"), ("\\displaystyle", ""), ("\\textstyle", ""), ("\\pmod", "\\bmod "), ("\\limits", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("°", ""), ("\\$", ""),
    ("$", ""), ("\\%", "%"), ("{,}", ","), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\lvert", "|"),
    ("\\rvert", "|"), ("\\vert", "|"), ("\\mid", "|"), ("\\qquad", ","), ("\\quad", ","), ("\\lor", ","),
    ("\\vee", ","), (";", ","), ("~", " "), ("−", "-"), ("×", "\\times "), ("·", "\\cdot "), ("π", "\\pi "),
    ("∞", "\\infty "), ("√", "\\sqrt"), ("≤", "\\le "), ("≥", "\\ge "), ("⩽", "\\le "), ("⩾", "\\ge "),
    ("\\mathbb{R}", "(-\\infty,\\infty)"), ("\\emptyset", "∅"), ("\\varnothing", "∅"), ("\\{\\}", "∅"),
]
_INEQ = [("\\leqslant", "<="), ("\\geqslant", ">="), ("\\leqq", "<="), ("\\geqq", ">="), ("\\leq", "<="),
         ("\\geq", ">="), ("\\le", "<="), ("\\ge", ">="), ("\\lt", "<"), ("\\gt", ">"), ("\\neq", "≠"),
         ("\\ne", "≠")]
_STYLE = re.compile(r"\\(?:mathbf|boldsymbol|mathit|mathsf|textbf|textit|emph|bm|num)\s*\{([^{}]*)\}")
_UNITS = {"cm", "mm", "km", "m", "in", "ft", "inch", "inches", "feet", "foot", "yd", "yards", "miles",
          "meter", "meters", "units", "unit", "sq", "degrees", "degree", "dollars", "cents", "hours",
          "minutes", "seconds", "days", "mph", "kg", "g", "lb", "pounds", "ways", "people", "students"}
_MATRIX = re.compile(r"[(\[]?\\begin\{(?:[pbvBV]?|small)matrix\}(.*)\\end\{(?:[pbvBV]?|small)matrix\}[)\]]?|"
                     r"[(\[]\\begin\{array\}\{[^{}]*\}(.*)\\end\{array\}[)\]]")  # an array is a matrix in brackets


def _drop_text(s):
    """\\text{ cm} after a number is a unit, dropped; \\text{(C)} or \\text{no solution} alone is the answer."""
    s = re.sub(r"\\(?:text|mbox|textrm)\s*\{\s*(?:or|and)\s*\}|\s(?:or|and)\s", ",", s)  # x=1 or x=2
    s = re.sub(r"(?<=[\d}])\s*\\mathrm\s*\{\s*(?![ei]\s*\})[A-Za-z]\s*\}\s*$", "", s)  # 5\,\mathrm{J}: a unit
    s = re.sub(r"\\mathrm\s*\{\s*([A-Za-z])\s*\}", r"\1", _STYLE.sub(r"\1", s))  # \mathrm{e} is e
    rest = _TEXT.sub("", s)
    return rest if re.search(r"[0-9A-Za-z]", rest) else _TEXT.sub(r"\1", s)


def _repeating(m):
    """0.1\\overline{6} -> \\frac{1}{6}."""
    whole, head, rep = m[1] or "0", m[2], m[3]
    x = Fraction(int(whole + head + rep) - int(whole + head), (10 ** len(rep) - 1) * 10 ** len(head))
    return f"\\frac{{{x.numerator}}}{{{x.denominator}}}"


def _normalize(s):
    """A canonical string for an answer: equal strings are equal answers (the converse needs sympy)."""
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_boxed(s) or ""
    s = over_to_frac(unicode_tex(s))
    s = re.sub(r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])", "", s)
    s = re.sub(r"(?<!\\)\\[,;:! ]", "", s)  # spacing commands, but not the row break \\ of a matrix
    s = re.sub(r"(\\(?:sin|cos|tan|sec|csc|cot)\s*\(?)\s*(\d+\.?\d*)\s*\^\s*\{?\\circ\}?", r"\1\\frac{\2\\pi}{180}", s)
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = re.sub(r"\\(?:text|mathrm|operatorname)\s*\{\s*(gcd|lcm|mod)\s*\}|\\operatorname\s*\{(max|min)\}",
               r"\\\1\2 ", s)  # \text{lcm}(4,6), but 5\text{ min} is a unit
    s = _drop_text(s).strip().rstrip(".").strip()
    s = re.sub(r"^\\\[|\\\]$|^\\\(|\\\)$", "", s).strip()
    s = re.sub(r",\s*(?=,)", "", s).strip(", ")  # x = 1, \quad x = 2 and 1; 2 are lists
    s = re.sub(r"(?<!\d)(\d*)\.(\d*)\\(?:overline|bar)\{(\d+)\}", _repeating, s)
    s = scientific(s)
    m = re.fullmatch(r"([+-]?[\d.]*\d)(\s*)([A-Za-z]+(?:\s+[A-Za-z]+)*)(\^\{?[23]\}?)?", s)
    if m and (m[3] in _UNITS or m[2] and len(m[3]) > 1):  # "12 cm", "5 dollars", but not "2x"
        s = m[1]
    s = re.sub(r"_(\w)", r"_{\1}", s)  # before spaces go: \log_2 8 is not \log_{28}
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\0", s)  # the space that ends a command stays
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = re.sub(r"\^\{(\w)\}", r"^\1", unnest(s))  # x^{2} -> x^2
    for old, new in _INEQ:
        s = re.sub(re.escape(old) + r"(?![A-Za-z]) ?", new, s)
    s = re.sub(r"^[a-z]\\in", "", s)  # x \in [0, 1]
    while s[:1] == "{" and (brace_group(s, 0) or (0, 0))[1] == len(s):
        s = s[1:-1]  # {5} -> 5
    return s


def _choice(s, mode="only"):
    """The letter of a multiple-choice answer. only: C, (C), \\text{(C)}; lead: (C) 12; any: either, or
    C. 12. A letter inside an expression (2C, C^2, \\mathrm{C}+1) is no choice."""
    t = re.sub(r"^(?:[Cc]hoice|[Oo]ption|[Aa]nswer):?", "", re.sub(r"\\[A-Za-z]+|[{}$\s]", "", s))
    if len(re.findall(r"\([A-E]\)", t)) > 1:
        return None  # (A) and (B) is two choices
    pattern = {"only": r"\(?([A-E])\)?\.?$()", "lead": r"\(([A-E])\)()",
               "any": r"\(([A-E])\)|([A-E])(?:\.?$|[.:)](?=[\d\\+-]))"}[mode]
    m = re.match(pattern, t)
    return (m[1] or m[2]) if m else None


# ---------------------------------------------------------------------------- structure: tuples, sets, intervals


def _parse(s):
    """(kind, brackets, items), kind one of scalar, seq (tuple, interval), bag (unordered), matrix."""
    s = interval(s)
    m = _MATRIX.fullmatch(s)
    if m:
        return ("matrix", "", [row.split("&") for row in (m[1] or m[2]).split("\\\\") if row])
    if "\\cup" in s:
        return ("bag", "{}", s.split("\\cup"))
    if s.startswith("\\{") and s.endswith("\\}"):
        return _bag(split_top(s[2:-2])[0], "{}")
    items, enclosed = split_top(s)
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and enclosed:
        items = split_top(s[1:-1])[0]
        return _parse(items[0]) if len(items) == 1 and s[0] + s[-1] == "()" else ("seq", s[0] + s[-1], items)
    return _bag(items)


def _bag(items, brackets=""):
    """Unordered answers; a \\pm b is the two answers a+b and a-b."""
    out = []
    for it in items:
        out += [it.replace("\\pm", "+"), it.replace("\\pm", "-")] if it.count("\\pm") == 1 else [it]
    out = [it.lstrip("+") for it in out if it]
    return ("scalar", "", out) if len(out) == 1 else ("bag", brackets, out)


def _struct_equal(a, b, deadline):
    """Equality of two _parse results: same kind, same brackets, equal items (in order unless a bag)."""
    (ka, ba, ia), (kb, bb, ib) = a, b
    if {ka, kb} == {"bag", "seq"} and {ba, bb} == {"", "()"}:  # "1, 2" for the point (1, 2)
        ka, kb, ba, bb = "seq", "seq", "()", "()"
    ka, kb = ("bag", "bag") if {ka, kb} == {"bag", "scalar"} else (ka, kb)  # 2, 2 is the one solution 2
    if ka != kb or (ka != "bag" and len(ia) != len(ib)) or (ka == "seq" and ba != bb) or len(ia) > 100:
        return False
    if ka == "bag":  # items may be tuples themselves: (1,2),(2,1)
        return _same_set(ia, ib, lambda x, y: _struct_equal(_parse(x), _parse(y), deadline))
    if ka == "matrix":
        ia, ib = [x for row in ia for x in row + ["&"]], [x for row in ib for x in row + ["&"]]  # "&" ends a row
    return len(ia) == len(ib) and all(_scalar_equal(x, y, deadline) for x, y in zip(ia, ib))


def _same_set(xs, ys, equal):
    """Do xs and ys list the same solutions (in any order, a repeat counting once)?"""
    seen = {}

    def match(x, y):
        if (x, y) not in seen:
            seen[x, y] = x == y or equal(x, y)
        return seen[x, y]
    return all(any(match(x, y) for y in ys) for x in xs) and all(any(match(x, y) for x in xs) for y in ys)


# ---------------------------------------------------------------------------- labels, chains and equations

_NAME = r"(?:[A-Za-z]|\\[a-z]+ ?)(?:_\{[^{}]*\})?'*"  # x, a_{10}, \theta, f'
_LABEL = re.compile(rf"{_NAME}(?:\^\{{-1\}})?(?:\([^=]*\))?|[A-Z]{{2,3}}|m?\\angle ?[A-Z]{{1,3}}|"
                    rf"\((?:{_NAME},)+{_NAME}\)|{_NAME}(?::{_NAME})+")  # f(2), AB, \angle A, (p,q), X:Y


def _sides(s):
    """The parts of s between top-level '=' signs; [s] for a list (a top-level comma) or no '='."""
    parts, depth, start = [], 0, 0
    for k, c in enumerate(s if "=" in s else ""):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0 and c == ",":
            return [s]
        if depth == 0 and c == "=" and s[k - 1:k] not in ("<", ">"):
            parts, start = parts + [s[start:k]], k + 1
    return parts + [s[start:]]


def _letters(s):
    """The variables an answer mentions: letters outside commands, Greek letters (e and i are constants)."""
    greek = {c for c in re.findall(r"\\([a-z]+)", s) if c in _GREEK}
    return set(re.findall(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", s))) - {"e", "i"} | greek


def _by_name(p, label):
    """q = 2, p = 3 read against a gold labelled (p,q): the values in the gold's order, as a tuple."""
    items, order = split_top(p)[0], split_top(label[1:-1])[0] if label[:1] == "(" else []
    pairs = dict(x.split("=", 1) for x in items if x.count("=") == 1)
    return "(" + ",".join(pairs[n] for n in order) + ")" if sorted(pairs) == sorted(order) == sorted(
        x.split("=")[0] for x in items) else p


def _value_equal(p, g, deadline):
    """Answers with '=': x = 3 (a label), 3/8 = 0.375 (a chain: every value must equal the gold), a gold
    (p,q) = (3,2) (its label goes), or two equations (equal up to rearrangement or a nonzero factor)."""
    head, _, tail = p.partition("\\approx")
    P, G = _sides(head), _sides(g.partition("\\approx")[0])
    if len(P) == len(G) == 2 and _equation_equal(P, G, deadline):
        return True
    if len(G) > 1 and not all(_LABEL.fullmatch(x) or not _letters(x) for x in G[:-1]):
        return False  # the gold is an equation (not a label or a chain of values), and p is not the same one
    label, g = "=".join(G[:-1]), G[-1]
    if len(P) == 1 and not tail:
        return _struct_equal(_parse(_by_name(P[0], label)), _parse(g), deadline)
    gl = _letters(g)  # a part naming other variables (y =, f(2) =, (a,b) =) is a label, not a value
    values = [x for x in P if _letters(x) <= gl] or [x for x in _sides(tail) if _letters(x) <= gl]
    if gl and not all(_LABEL.fullmatch(x) for x in P if x not in values):
        return False  # x^2 = -y relates the variables: not a label for the gold x^2
    return bool(values) and all(_struct_equal(_parse(x), _parse(g), deadline) for x in values)


def _equation_equal(P, G, deadline):
    """Are lhs = rhs and lhs' = rhs' the same equation: lhs - rhs a nonzero multiple of lhs' - rhs'?"""
    if any(_parse(x)[0] != "scalar" or not x for x in P + G):
        return False
    pe, ge = to_python("=".join(P)), to_python("=".join(G))
    return bool(pe and ge and names(pe) == names(ge) != set()) and sympy_equal(pe, ge, 0, deadline, "ratio")


def _set_equal(p, g, deadline):
    """Equality of two sets of reals in set notation: \\mathbb{R}\\setminus\\{0\\} == (-\\infty,0)\\cup(0,\\infty)."""
    ps, gs = set_source(p), set_source(g)
    return bool(ps and gs and not names(ps) | names(gs)) and sympy_equal(ps, gs, 0, deadline, "set")


# ---------------------------------------------------------------------------- scalars


def _number(s):
    """Exact value of a plain number (5, -0.25, 3/4, \\frac{3}{4}, 2\\frac{1}{2}), else None."""
    if len(s) > 40:
        return None  # keeps Fraction away from giant literals
    sign, s = (-1 if s[:1] == "-" else 1), s[1:] if s[:1] in "+-" else s
    if re.fullmatch(r"\d+\.?\d*|\.\d+", s):
        return sign * Fraction(s)
    m = re.fullmatch(r"(?:(\d+\.?\d*|\.\d+)\\(?:times|cdot))?10\^(?:(\d)|\{([+-]?\d{1,4})\})", s)  # 3.2\times10^{-4}
    if m:
        return sign * Fraction(m[1] or 1) * Fraction(10) ** int(m[2] or m[3])
    m = re.fullmatch(r"()(\d+)/()(\d+)()", s) or re.fullmatch(  # a/b, \frac{a}{b}, \frac12, 2\frac{1}{2}
        r"(\d*)\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))", s)
    if not m or int(m[4] or m[5]) == 0:
        return None
    return sign * (int(m[1] or 0) + Fraction(int(m[2] or m[3]), int(m[4] or m[5])))  # 2\frac{1}{2} is 5/2


def _scalar_equal(p, g, deadline):
    """Equality of two single normalised answers: exact for numbers, else by sympy in a worker."""
    if "\\approx" in p + g or len(_sides(p)) > 1 or len(_sides(g)) > 1:
        return _value_equal(p, g, deadline)
    if p == g:
        return True
    scales = [1] if p.endswith("%") and g.endswith("%") else \
        [1] + [Fraction(1, 100)] * p.endswith("%") + [100] * g.endswith("%")  # 50% is 50 or 0.5
    p, g = p.rstrip("%"), g.rstrip("%")
    m = re.fullmatch(r"[+-]?\d*\.(\d{2,})", g)
    places = len(m[1]) if m else 0
    pn, gn = _number(p), _number(g)
    if pn is not None and gn is not None:
        return any(pn * s == gn or places and not terminates(pn.denominator)
                   and abs(pn * s - gn) <= Fraction(1, 2 * 10 ** places) for s in scales)
    pe, ge = to_python(p), to_python(g)
    if pe is None or ge is None or not (names(pe) <= names(ge) or names(ge) <= names(pe)):
        return False  # 2\pi r is not 2\pi R; but \sin^2 x + \cos^2 x may well be 1
    return any(sympy_equal(f"({pe})*{s}" if s != 1 else pe, ge, places, deadline) for s in scales)


# ---------------------------------------------------------------------------- the reward


def is_equiv(pred, gold):
    """Is the answer string pred equivalent to the gold answer string? Never raises (rules: module docstring)."""
    try:
        deadline = Deadline(TIME_BUDGET)
        return isinstance(pred, str) and isinstance(gold, str) and _equiv(pred, gold, deadline)
    except Exception:  # malformed input of any kind (even nesting deep enough to recurse) is a wrong answer
        return False


def _equiv(pred, gold, deadline):
    if len(pred) > 2 * MAX_LEN or len(gold) > 2 * MAX_LEN:
        return pred.strip() == gold.strip()
    up, ug = units(pred), units(gold)
    if up and ug and up != ug:
        return False  # 20 m is not 20 cm
    p, g = _normalize(pred.strip()), _normalize(gold.strip())
    if not p or not g or p == g or (p.isalpha() and p.lower() == g.lower()):  # "No solution"
        return bool(p) and p.lower() == g.lower()
    if len(p) > MAX_LEN or len(g) > MAX_LEN:
        return False
    if _choice(gold):
        return _choice(pred, "any") == _choice(gold)
    if _choice(gold, "lead"):  # "(B) 14": the letter or the value, but not another letter
        if _choice(pred, "any"):
            return _choice(pred, "any") == _choice(gold, "lead")
        g = re.sub(r"^\([A-E]\)", "", g)
    p = re.sub(r"^\([A-E]\)(?=.)", "", p)  # (B) 2\sqrt{2} for a gold 2\sqrt{2}
    if _value_equal(p, g, deadline):
        return True
    return bool(re.search(r"\\cup|\\cap|\\setminus|\\backslash|≠|[)\]}]-\\\{", p + g)) and _set_equal(p, g, deadline)


def reward(completion: str, answer: str, checker: str = "hapo") -> float:
    """Eq. 4: 1.0 if the last boxed answer in completion equals the gold answer, else 0.0. Never raises
    for any completion or answer; an unknown or missing checker raises (see check_checker)."""
    if checker != "hapo" and checker not in _checked:
        _checked.add(check_checker(checker))
    try:
        warm_spare(first=True)
        if checker == "math_verify":
            ok = isinstance(completion, str) and isinstance(answer, str) and \
                math_verify_equal(completion, answer, Deadline(TIME_BUDGET))
            return float(ok)
        return float(is_equiv(extract_boxed(completion), answer))
    except Exception:  # nothing about one completion may stop a training run
        return 0.0


_checked = set()


# ---------------------------------------------------------------------------- benchmark


def _benchmark(n_prompts=128, n_samples=8):
    """Time one LUFFY-sized step of synthetic chain-of-thought completions: 128 prompts x 8."""
    import random
    rng, jobs = random.Random(0), []
    forms = [  # gold | right answers | wrong answers
        "\\frac{3\\sqrt{2}}{4} | \\dfrac{3\\sqrt2}{4}; \\frac{3}{2\\sqrt2} | \\frac{3\\sqrt{3}}{4}",
        "(-\\infty, 2] | (-\\infty,2]; x \\le 2; \\left(-\\infty, 2\\right] | (-\\infty, 2); [2, \\infty)",
        "x^2+2x+1 | (x+1)^2; x^2 + 2x + 1; 1+2x+x^2 | x^2+1; (x-1)^2",
        "12 | 12; 12\\text{ cm}; 12.0; x = 12 | 13; -12; 1.2",
        "\\{1,2\\} | \\{2, 1\\}; 1, 2; x=1 \\text{ or } x=2 | \\{1, 3\\}; 1",
        "C | C; \\text{(C)}; \\textbf{(C) }7 | B; D",
        "\\frac{1}{2} | 0.5; 1/2; \\tfrac12; 50\\% | 2; \\frac{1}{3}; 0.55",
        "204 | 204; 204.; 0204 | 240; 2004; 20.4",
        "2\\pi | 2\\pi; \\pi \\cdot 2; \\frac{4\\pi}{2} | \\pi; 4\\pi; 6.28",
        "1,000 | 1000; 1{,}000; 1,000 | (1, 000); 100",
    ]
    thought = "We expand $(a+b)^2 = a^2 + 2ab + b^2$ and try $\\boxed{7}$ first, which fails. " * 100  # ~8k chars
    for p in range(n_prompts):
        gold, good, bad = forms[p % len(forms)].split(" | ")
        for s in range(n_samples):  # two of eight answers are unique to their prompt: no cache hits
            pred = rng.choice((good if rng.random() < 0.5 else bad).split("; ")) + ("" if s < 6 else f"+{p}")
            jobs.append((f"<think>\n{thought}\n</think>\nSo the answer is $\\boxed{{{pred}}}$.", gold))
    t0 = time.perf_counter()
    sympy_equal("x", "x", 0, time.monotonic() + STARTUP_TIMEOUT)
    t1 = time.perf_counter()
    scores = [reward(c, a) for c, a in jobs]
    t2 = time.perf_counter()
    print(f"worker startup {t1 - t0:.2f} s; {len(jobs)} completions in {t2 - t1:.2f} s "
          f"({1e3 * (t2 - t1) / len(jobs):.2f} ms each); mean reward {sum(scores) / len(scores):.3f}")


if __name__ == "__main__":
    _benchmark()
