"""Eq. 4, the reward: R(tau) = 1.0 if the completion's final answer equals the gold answer, else 0.0.

What counts as correct:
- The prediction is the content of the *last* `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`) in the
  completion; no box, an empty box or an unclosed one scores 0. The gold may be boxed or in `$...$`.
- Both sides are normalised first: `\\left`/`\\right`, spacing (`\\!`, `\\,`), `\\dfrac`, `$`, degrees,
  units (`12\\text{ cm}`, `5 dollars`), thousands separators (`1,000`, but `(1, 000)` is a tuple),
  `x =` prefixes, trailing periods; `x \\le 2` becomes the interval `(-\\infty, 2]`.
- Numbers compare exactly and without sympy: `0.5 == 1/2 == \\frac{1}{2}`; `50\\%` equals 50 or 0.5.
- A gold letter A-E is multiple choice: `C == (C) == \\text{(C)} == \\textbf{(C) } 12`.
- Tuples and intervals compare element-wise, bracket types included. Sets `\\{..\\}`, bare lists
  (`2, 3 == 3, 2`), `a \\pm b` and unions of intervals compare as unordered collections.
- Anything else is parsed to sympy: equal when the difference is exactly 0, or is 0 to 25 digits at
  a few rational points. A gold decimal with 2+ places (`1.41`) was rounded, so it also accepts an
  answer no finite decimal can equal (`\\sqrt{2}`, `\\frac{1}{3}` for `0.33`) that rounds to it.

Sympy runs in persistent child processes with a hard deadline (TIME_BUDGET per call; symbolic.py), so
a call returns in about a second from any thread; power towers and huge factorials are refused before
evaluation.
`python reward.py` times a step's worth of completions (LUFFY's 128 prompts x 8).
"""
import re, time
from fractions import Fraction

from symbolic import STARTUP_TIMEOUT, brace_group, names, sympy_equal, terminates, to_python, warm_spare

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
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\displaystyle", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("°", ""), ("\\$", ""),
    ("$", ""), ("\\%", "%"), ("{,}", ","), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\lvert", "|"),
    ("\\rvert", "|"), ("\\vert", "|"), ("\\mid", "|"), ("\\qquad", " "), ("\\quad", " "), ("~", " "),
    ("−", "-"), ("×", "\\times "), ("·", "\\cdot "), ("π", "\\pi "), ("∞", "\\infty "), ("√", "\\sqrt"),
    ("≤", "\\le "), ("≥", "\\ge "), ("\\mathbb{R}", "(-\\infty,\\infty)"), ("\\emptyset", "∅"),
    ("\\varnothing", "∅"), ("\\{\\}", "∅"),
]
_INEQ = [("\\leqslant", "<="), ("\\geqslant", ">="), ("\\leq", "<="), ("\\geq", ">="), ("\\le", "<="),
         ("\\ge", ">="), ("\\lt", "<"), ("\\gt", ">")]
_STYLE = re.compile(r"\\(?:mathbf|boldsymbol|mathit|mathsf|textbf|textit|emph|bm)\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textrm|textnormal|mbox|mathrm|operatorname)\s*\{([^{}]*)\}(\s*\^\s*\{?[23]\}?)?")
_UNITS = {"cm", "mm", "km", "m", "in", "ft", "inch", "inches", "feet", "foot", "yd", "yards", "miles",
          "meter", "meters", "units", "unit", "sq", "degrees", "degree", "dollars", "cents", "hours",
          "minutes", "seconds", "days", "mph", "kg", "g", "lb", "pounds", "ways", "people", "students"}


def _drop_text(s):
    """\\text{ cm} after a number is a unit, dropped; \\text{(C)} or \\text{no solution} alone is the answer."""
    s = re.sub(r"\\(?:text|mbox|textrm)\s*\{\s*(?:or|and)\s*\}|\s(?:or|and)\s", ",", s)  # x=1 or x=2
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
    s = re.sub(r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])", "", s)
    s = re.sub(r"(?<!\\)\\[,;:! ]", "", s)  # spacing commands, but not the row break \\ of a matrix
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = _drop_text(s).strip().rstrip(".").strip()
    s = re.sub(r"^\\\[|\\\]$|^\\\(|\\\)$", "", s).strip()
    s = re.sub(r"(?<!\d)(\d*)\.(\d*)\\overline\{(\d+)\}", _repeating, s)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 -> 1000; "1, 000" is a list
        s = s.replace(",", "")
    m = re.fullmatch(r"([+-]?[\d.]*\d)(\s*)([A-Za-z]+(?:\s+[A-Za-z]+)*)(\^\{?[23]\}?)?", s)
    if m and (m[3] in _UNITS or m[2] and len(m[3]) > 1):  # "12 cm", "5 dollars", but not "2x"
        s = m[1]
    s = re.sub(r"_(\w)", r"_{\1}", s)  # before spaces go: \log_2 8 is not \log_{28}
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\0", s)  # the space that ends a command stays
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = re.sub(r"\^\{(\w)\}", r"^\1", s)  # x^{2} -> x^2
    for old, new in _INEQ:
        s = re.sub(re.escape(old) + r"(?![A-Za-z]) ?", new, s)
    s = re.sub(r"^[a-z]\\in", "", s)  # x \in [0, 1]
    while s[:1] == "{" and (brace_group(s, 0) or (0, 0))[1] == len(s):
        s = s[1:-1]  # {5} -> 5
    return s


def _choice(s, mode="only"):
    """The letter of a multiple-choice answer. only: C, (C), \\text{(C)}; lead: (C) 12; any: either."""
    t = re.sub(r"\\[A-Za-z]+|[{}$\s]", "", s)
    pattern = {"only": r"\(?([A-E])\)?$()", "lead": r"\(([A-E])\)()", "any": r"\(([A-E])\)|([A-E])(?![A-Za-z0-9])"}
    m = re.match(pattern[mode], t)
    return (m[1] or m[2]) if m else None


# ---------------------------------------------------------------------------- structure: tuples, sets, intervals


def _split_top(s):
    """(parts split on commas outside brackets, whether the bracket opening s[0] closes only at s[-1])."""
    parts, depth, start, enclosed = [], 0, 0, True
    for k, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        enclosed &= depth > 0 or k == len(s) - 1
        if c == "," and depth == 0:
            parts, start = parts + [s[start:k]], k + 1
    return parts + [s[start:]], enclosed


def _interval(s):
    """x < 2 -> (-\\infty,2), 1 <= x < 3 -> [1,3): an inequality is an interval."""
    m = re.fullmatch(r"(.+?)(<=?)[a-z](<=?)(.+)", s)
    if m:
        return "[("[m[2] == "<"] + m[1] + "," + m[4] + "])"[m[3] == "<"]
    m = re.fullmatch(r"[a-z](<=?|>=?)([^<>=]+)", s)
    ends = {"<": "(-\\infty,{})", "<=": "(-\\infty,{}]", ">": "({},\\infty)", ">=": "[{},\\infty)"}
    return ends[m[1]].format(m[2]) if m else s


def _parse(s):
    """(kind, brackets, items), kind one of scalar, seq (tuple, interval), bag (unordered), matrix."""
    s = _interval(s)
    m = re.fullmatch(r"\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}", s)
    if m:
        return ("matrix", "", [row.split("&") for row in m[1].split("\\\\") if row])
    if "\\cup" in s:
        return ("bag", "{}", s.split("\\cup"))
    if s.startswith("\\{") and s.endswith("\\}"):
        return _bag(_split_top(s[2:-2])[0], "{}")
    items, enclosed = _split_top(s)
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and enclosed:
        items = _split_top(s[1:-1])[0]
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
    if ka != kb or len(ia) != len(ib) or (ka == "seq" and ba != bb) or len(ia) > 100:
        return False
    if ka == "bag":  # items may be tuples themselves: (1,2),(2,1)
        return _unordered(ia, ib, lambda x, y: _struct_equal(_parse(x), _parse(y), deadline))
    if ka == "matrix":
        ia, ib = [x for row in ia for x in row + ["&"]], [x for row in ib for x in row + ["&"]]  # "&" ends a row
    return len(ia) == len(ib) and all(_scalar_equal(x, y, deadline) for x, y in zip(ia, ib))


def _unordered(xs, ys, equal):
    """Can xs and ys be paired off one to one by equal?"""
    left = list(ys)
    xs = [x for x in xs if x not in left or left.remove(x)]  # identical items pair up without sympy
    for x in xs:
        k = next((k for k, y in enumerate(left) if equal(x, y)), None)
        if k is None:
            return False
        left.pop(k)
    return True


# ---------------------------------------------------------------------------- scalars


def _number(s):
    """Exact value of a plain number (5, -0.25, 3/4, \\frac{3}{4}, 2\\frac{1}{2}), else None."""
    if len(s) > 40:
        return None  # keeps Fraction away from giant literals
    sign, s = (-1 if s[:1] == "-" else 1), s[1:] if s[:1] in "+-" else s
    if re.fullmatch(r"\d+\.?\d*|\.\d+", s):
        return sign * Fraction(s)
    m = re.fullmatch(r"()(\d+)/()(\d+)()", s) or re.fullmatch(  # a/b, \frac{a}{b}, \frac12, 2\frac{1}{2}
        r"(\d*)\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))", s)
    if not m or int(m[4] or m[5]) == 0:
        return None
    return sign * (int(m[1] or 0) + Fraction(int(m[2] or m[3]), int(m[4] or m[5])))  # 2\frac{1}{2} is 5/2


def _scalar_equal(p, g, deadline):
    """Equality of two single normalised answers: exact for numbers, else by sympy in a worker."""
    lhs = r"(?:m?\\angle ?)?\\?[A-Za-z]+(?:_\{\w+\})?(?:\([a-z]\))?=([^=]+)"  # x =, f(x) =, AB =: not the answer
    p, g = [t.split("\\approx")[0] for t in (p, g)]  # \frac{1}{6} \approx 0.167
    p, g = [t.rsplit("=", 1)[-1] if t.count("=") > 1 else t for t in (p, g)]  # AB = 2\sqrt{3} = \sqrt{12}
    p, g = [m[1] if (m := re.fullmatch(lhs, t)) else t for t in (p, g)]
    if p == g:
        return True
    scales = [1] + [Fraction(1, 100)] * p.endswith("%") + [100] * g.endswith("%")  # 50% is 50 or 0.5
    p, g = p.rstrip("%"), g.rstrip("%")
    m = re.fullmatch(r"[+-]?\d*\.(\d{2,})", g)
    places = len(m[1]) if m else 0
    pn, gn = _number(p), _number(g)
    if pn is not None and gn is not None:
        return any(pn * s == gn or places and not terminates(pn.denominator)
                   and abs(pn * s - gn) <= Fraction(1, 2 * 10 ** places) for s in scales)
    pe, ge = to_python(p), to_python(g)
    if pe is None or ge is None or ("=" in p) != ("=" in g) or names(pe) != names(ge):
        return False
    signs = ("", "-") if "=" in g else ("",)  # an equation may have its sides swapped
    return any(sympy_equal(f"({pe})*{s}", f"{sign}({ge})", places, deadline) for s in scales for sign in signs)


# ---------------------------------------------------------------------------- the reward


def is_equiv(pred, gold):
    """Is the answer string pred equivalent to the gold answer string? Never raises (rules: module docstring)."""
    try:
        deadline = time.monotonic() + TIME_BUDGET
        return isinstance(pred, str) and isinstance(gold, str) and _equiv(pred, gold, deadline)
    except Exception:  # malformed input of any kind (even nesting deep enough to recurse) is a wrong answer
        return False


def _equiv(pred, gold, deadline):
    if len(pred) > 2 * MAX_LEN or len(gold) > 2 * MAX_LEN:
        return pred.strip() == gold.strip()
    p, g = _normalize(pred.strip()), _normalize(gold.strip())
    if not p or not g or p == g or (p.isalpha() and p.lower() == g.lower()):  # "No solution"
        return bool(p) and p.lower() == g.lower()
    if len(p) > MAX_LEN or len(g) > MAX_LEN:
        return False
    if _choice(gold):
        return _choice(pred, "any") == _choice(gold)
    if _choice(gold, "lead"):  # "(B) 14": the letter or the value
        if _choice(pred, "any") == _choice(gold, "lead"):
            return True
        g = re.sub(r"^\([A-E]\)", "", g)
    return _struct_equal(_parse(p), _parse(g), deadline)


def reward(completion: str, answer: str) -> float:
    """Eq. 4: 1.0 if the last boxed answer in completion equals the gold answer, else 0.0. Never raises."""
    try:
        warm_spare(first=True)
        return float(is_equiv(extract_boxed(completion), answer))
    except Exception:  # nothing about one completion may stop a training run
        return 0.0


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
