"""Reading TeX: the answer notations reward.py meets, rewritten for it, and LaTeX to sympy source.

Plain-TeX and Unicode spellings become LaTeX (`{a \\over b}`, `½`, `x²`, `≠`); redundant brackets
around a value go (`((((5))))`), so that deep nesting costs nothing downstream. to_python turns an
answer into source for sympy's parse_expr: `\\frac`, roots, `\\sin^2 x`, `\\sin 2x`, `\\log_b`, `|x|`,
`\\sum`/`\\prod` with limits. Only known names survive, so evaluating the source is safe; symbolic.py
evaluates it in a worker process under a deadline. Notations read whole: units (`\\text{ cm}`, `km/h`),
scientific notation (`3.2E+04`), inequalities as intervals whichever way round (`3 > x >= 1`), and sets
of reals (`\\mathbb{R}\\setminus\\{0\\}`) as sympy set source.
"""
import re, unicodedata


def brace_group(s, i):
    """(content, index after) of the brace group opening at s[i]; None if it never closes."""
    depth, k = 0, i
    while k < len(s):
        if s[k] == "\\":
            k += 2  # \{ and \} are literal braces, not grouping
            continue
        depth += (s[k] == "{") - (s[k] == "}")
        if depth == 0:
            return s[i + 1:k], k + 1
        k += 1
    return None


# ---------------------------------------------------------------------------- other spellings of the same TeX

_SYMBOLS = {"≠": "\\ne ", "∪": "\\cup ", "∩": "\\cap ", "∖": "\\setminus ", "ℝ": "\\mathbb{R}", "∈": "\\in ",
            "±": "\\pm ", "÷": "\\div ", "⁄": "/", "∅": "\\emptyset "}


def unicode_tex(s):
    """Unicode maths as LaTeX: vulgar fractions (2½ is 5/2), super- and subscripts, set and relation signs."""
    if s.isascii():
        return s
    out, last = [], None  # one item per input character, so looking back is cheap
    for c in s:
        d = unicodedata.decomposition(c).split()
        kind = d[0] if d[:1] in (["<super>"], ["<sub>"]) else None
        if d[:1] == ["<fraction>"] and "2044" in d[2:-1]:  # '<fraction> 0031 2044 0032' is 1/2
            k = d.index("2044")
            num, den = (int("".join(chr(int(h, 16)) for h in part)) for part in (d[1:k], d[k + 1:]))
            j = len(out) - (out[-1:] == [" "])
            while j > 0 and out[j - 1].isdigit() and len(out) - j < 20:  # 2½ is a mixed number, 5/2
                j -= 1
            whole = "".join(out[j:]).strip()
            out[j:] = [f"\\frac{{{int(whole or 0) * den + num}}}{{{den}}}"]
        elif kind:  # a run such as x¹⁰ or a_ₙ becomes one ^{..} or _{..}
            ch = chr(int(d[1], 16)).replace("\u2212", "-")
            mark = "^{" if kind == "<super>" else "_{"
            out[-1:] = [out[-1][:-1] + ch + "}"] if kind == last else out[-1:] + [mark + ch + "}"]
        else:
            out.append(_SYMBOLS.get(c, c))
        last = kind
    return "".join(out)


def over_to_frac(s):
    """Plain TeX `{a \\over b}` and `{n \\choose k}` as \\frac{a}{b} and \\binom{n}{k}: each infix
    command splits the brace group around it (or the whole answer, outside any group)."""
    for _ in range(50):
        m = re.search(r"\\(over|choose)(?![A-Za-z])", s)
        if not m:
            return s
        depth, i = 0, m.start() - 1
        while i >= 0 and not (s[i] == "{" and depth == 0 and s[i - 1:i] != "\\"):
            depth += (s[i] == "}") - (s[i] == "{") if s[i - 1:i] != "\\" else 0
            i -= 1
        group = brace_group(s, i) if i >= 0 else (s, len(s))
        if group is None:
            return s
        at = m.start() - i - 1  # where the command sits in the group: not a \\overline before it
        left, right = group[0][:at], group[0][at + m.end() - m.start():]
        cmd = "\\frac" if m[1] == "over" else "\\binom"
        frac = f"{cmd}{{{left.strip()}}}{{{right.strip()}}}"
        s = s[:i] + "{" + frac + "}" + s[group[1]:] if i >= 0 else frac
    return s


def scientific(s):
    """Scientific notation in one spelling, m\\times10^{k}: 3.2e4, 3.2E+04, 3.2 x 10^4, 1,234.5 \\cdot 10^3
    (the thousands separators go, as in a plain 1,000; "1, 000" is a list). 1 \\times 10^9 is 10^9."""
    m = re.match(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?(?=$|\s*\\(?:times|cdot)|[eE][+-]?\d)", s)
    s = m[0].replace(",", "") + s[m.end():] if m else s
    s = re.sub(r"(?<![\w\\^_.])(\d+\.?\d*|\.\d+)[eE](-?)\+?0*(\d+)(?![\w.^])", r"\1\\times10^{\2\3}", s)
    s = re.sub(r"(?<=\d)\s*[xX*]\s*(?=10\^)", r"\\times", s)
    return re.sub(r"(?<![\w.])1(?:\.0*)?\s*\\(?:times|cdot)\s*(?=10\^)", "", s)


def unnest(s):
    """Drop brackets that only repeat the pair around them: ((5)) -> (5), {{x}} -> {x}, {(x)} -> {x}."""
    if not re.search(r"[({][({]", s):
        return s
    stack, match = [], {}
    for k, c in enumerate(s):
        if s[k - 1:k] == "\\" and c in "{}":
            continue  # \{ \} are set braces
        if c in "({":
            stack.append(k)
        elif c in ")}":
            if not stack or s[stack[-1]] != "({"[c == "}"]:
                return s  # unbalanced: leave it to fail later
            match[stack.pop()] = k
    drop = {k for k, j in match.items() if match.get(k - 1) == j + 1}  # the inner pair of a doubled one
    closers = {match[k] for k in drop}
    return "".join(c for k, c in enumerate(s) if k not in drop and k not in closers)


# ---------------------------------------------------------------------------- LaTeX -> sympy source

_FUNCS = {"sin", "cos", "tan", "sec", "csc", "cot", "asin", "acos", "atan", "asec", "acsc", "acot", "arcsin",
          "arccos", "arctan", "sinh", "cosh", "tanh", "log", "exp", "sqrt", "root", "Abs", "floor", "ceiling",
          "binomial", "factorial", "pi", "oo", "Sum", "Product", "gcd", "lcm", "Max", "Min", "Mod"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "kappa", "lamda", "mu",
          "nu", "xi", "rho", "sigma", "tau", "phi", "chi", "psi", "omega"}
_COMMANDS = {"infty": "oo", "cdot": "*", "times": "*", "ast": "*", "div": "/", "ln": "log", "lambda": "lamda",
             "varphi": "phi", "varepsilon": "epsilon", "vartheta": "theta", "lfloor": "floor(", "rfloor": ")",
             "lceil": "ceiling(", "rceil": ")", "gcd": "gcd", "lcm": "lcm", "max": "Max", "min": "Min"}
_SET_NAMES = {"Interval", "Union", "Intersection", "Complement", "FiniteSet", "Reals", "EmptySet", "True", "False"}
_APPLIED = "arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|sec|csc|cot|ln|log|exp"
_EXPANDED = re.compile(rf"\\(frac|sqrt|binom|sum|prod|{_APPLIED})(?![A-Za-z])")
_BARE = re.compile(r" *(\d*\.?\d*(?:(?:[A-Za-z]|\\(?:%s|pi)(?![A-Za-z]) ?)(?:\^(?:\{[^{}]*\}|\w))?)*)"
                   % "|".join(_GREEK))  # 2x, 3\theta, x^2, \pi x: what \sin applies to without parentheses


def _arg(s, i):
    """(argument, index after) of a LaTeX argument at s[i]: a brace group, a command or one character."""
    while s[i:i + 1] == " ":
        i += 1
    if s[i:i + 1] == "{":
        return brace_group(s, i) or ("", len(s))
    m = re.match(r"\\[A-Za-z]+|.", s[i:])
    return (m.group(), i + m.end()) if m else ("", i)


def _operand(s, i):
    """(argument, index after) of a function applied at s[i]: \\sin(2x), \\sin{x}, \\sin\\frac{\\pi}{6},
    \\ln|x|, or a bare product \\sin 2x, \\cos 3\\theta, \\ln x^2 (the usual reading: sin(2x), not sin(2)x)."""
    while s[i:i + 1] == " ":
        i += 1
    if s[i:i + 1] == "(":
        depth = 0
        for j in range(i, len(s)):
            depth += (s[j] == "(") - (s[j] == ")")
            if depth == 0:
                return s[i + 1:j], j + 1
    if s[i:i + 1] == "{":
        return _arg(s, i)
    if s[i:i + 1] == "|" and "|" in s[i + 1:]:
        j = s.index("|", i + 1)
        return s[i:j + 1], j + 1
    m = re.match(r"\\(?:frac|binom)(?![A-Za-z])", s[i:]) or re.match(r"\\sqrt(?![A-Za-z])", s[i:])
    if m:
        j = i + m.end()
        for _ in range(2 if "sqrt" not in m.group() else 1):
            j = _arg(s, j)[1]
        return s[i:j], j
    m = _BARE.match(s, i)
    return m[1], m.end()


def _expand(s):
    """\\frac, \\sqrt, \\binom, \\sum, \\prod and applied functions (\\sin^2 x, \\ln 2) to call syntax."""
    out, i = [], 0
    while i < len(s):
        m = _EXPANDED.match(s, i)
        if not m:
            out.append(s[i])
            i += 1
            continue
        name, i = m[1], m.end()
        if name == "sqrt" and s[i:i + 1] == "[" and "]" in s[i:]:  # \sqrt[3]{x}
            j = s.index("]", i)
            a, i = _arg(s, j + 1)
            out.append(f" root({_expand(a)},{_expand(s[m.end() + 1:j])})")
        elif name in ("frac", "binom"):
            (a, i), fmt = _arg(s, i), "(({})/({}))" if name == "frac" else " binomial({},{})"
            b, i = _arg(s, i)
            out.append(fmt.format(_expand(a), _expand(b)))
        elif name == "sqrt":
            a, i = _arg(s, i)
            out.append(f" sqrt({_expand(a)})")
        elif name in ("sum", "prod"):
            big = _big_operator(name, s, i)
            out.append(big[0] if big else f"\\{name}")  # an unreadable \sum stays unknown: None
            i = big[1] if big else i
        else:
            power = ""
            if s[i:i + 1] == "^":  # \sin^2 x is (sin x)^2, \sin^{-1} x is arcsin x
                power, i = _arg(s, i + 1)
            a, i = _operand(s, i)
            f = _COMMANDS.get(name, name)
            if power.replace(" ", "") == "-1" and f in ("sin", "cos", "tan", "sec", "csc", "cot"):
                f, power = "a" + f, ""
            call = f" {f}({_expand(a)})" if a else f" {f} "
            out.append(f"(({call})^({_expand(power)}))" if power and a else call)
    return "".join(out)


def _big_operator(name, s, i):
    """(source, index after) of \\sum_{k=1}^{n} body at s[i] as Sum(k, 1, n, body): the body runs to
    the next top-level + or -. None when the limits are not written as _{k=a}^{b}."""
    i += 7 if s.startswith("\\limits", i) else 0
    if s[i:i + 1] != "_":
        return None
    lower, i = _arg(s, i + 1)
    m = re.fullmatch(r" *([A-Za-z]) *= *(.+)", lower)
    if not m or s[i:i + 1] != "^":
        return None
    upper, i = _arg(s, i + 1)
    depth, j = 0, i
    while j < len(s):
        depth += (s[j] in "({[") - (s[j] in ")}]")
        if depth < 0 or depth == 0 and s[j] in "+-=," and j > i and s[j - 1] not in "^_{(":
            break
        j += 1
    f = "Sum" if name == "sum" else "Product"
    return f" {f}({m[1]},{_expand(m[2])},{_expand(upper)},({_expand(s[i:j])}))", j


def to_python(s):
    """LaTeX -> source for sympy's parse_expr, or None. Only known names survive, so eval() is safe.
    \\gcd, \\operatorname{lcm}, \\max, \\min and a \\bmod b are read only with numbers for arguments."""
    m = re.fullmatch(r"(.+?)\\(?:bmod|pmod|mod)(?![A-Za-z])(.+)", s)  # 17 \bmod 5, 17 \pmod{5}
    if m:
        a, b = to_python(m[1]), to_python(m[2])
        return f"Mod(({a}),({b}))" if a and b and not names(a) | names(b) else None
    s = re.sub(r"(\\(?:max|min))\\\{(.*?)\\\}", r"\1(\2)", s)  # \min\{3, 7\}
    s = re.sub(r"\\log_\{?(\w+)\}?", r"\\frac{1}{\\ln(\1)}\\ln", s)  # change of base
    s = re.sub(r"(?<![\\A-Za-z])([A-Za-z])_\{?([A-Za-z0-9]+)\}?", r"\1_\2", _expand(s))  # x_{1} -> x_1
    unknown = [c for c in re.findall(r"\\([A-Za-z]+)", s) if c not in _COMMANDS and c not in _GREEK | _FUNCS]
    bars = re.sub(r"\\([A-Za-z]+)", lambda m: f" {_COMMANDS.get(m[1], m[1])} ", s).split("|")
    if unknown or len(bars) % 2 == 0:
        return None
    s = "".join(b + ("" if k == len(bars) - 1 else " Abs(" if k % 2 == 0 else ")") for k, b in enumerate(bars))
    s = s.replace("^", "**").translate(str.maketrans("{}[]", "()()"))
    if "=" in s:
        lhs, _, rhs = s.partition("=")
        s = f"({lhs})-({rhs})"

    def name(m):  # an unknown run of letters is a product of one-letter symbols: xy -> x*y
        head, _, sub = m[0].partition("_")
        if m[0] in _FUNCS or m[0] in _GREEK:
            return f" {m[0]} "
        return " " + " ".join(head[:-1]) + f" {head[-1]}{'_' + sub if sub else ''} "

    s = re.sub(r"[A-Za-z]+(?:_[A-Za-z0-9]+)?", name, s)
    if not re.fullmatch(r"[A-Za-z0-9_+\-*/()., !]*", s) or re.search(r"\.(?!\d)|(?<![A-Za-z])_|\*\*\*|//", s):
        return None  # attribute access, dunder names, floor division: not mathematics
    return None if re.search(r"\b(?:gcd|lcm|Max|Min)\b", s) and names(s) else s


def bound(src):
    """The indices of the sums and products in a source string (a symbol even when named i or e)."""
    return set(re.findall(r"(?:Sum|Product)\s*\(\s*([A-Za-z]\w*)\s*,", src))


def names(src):
    """The free symbols of a source string: e and i are constants, a sum's index is bound."""
    return set(re.findall(r"[A-Za-z]\w*", src)) - _FUNCS - _SET_NAMES - {"e", "i"} - bound(src)


# ---------------------------------------------------------------------------- notations read whole: units, sets


def split_top(s):
    """(parts split on commas outside brackets, whether the bracket opening s[0] closes only at s[-1])."""
    parts, depth, start, enclosed = [], 0, 0, True
    for k, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        enclosed &= depth > 0 or k == len(s) - 1
        if c == "," and depth == 0:
            parts, start = parts + [s[start:k]], k + 1
    return parts + [s[start:]], enclosed


_TEXT = re.compile(r"\\(?:text|textrm|textnormal|mbox|mathrm|operatorname)\s*\{([^{}]*)\}(\s*\^\s*\{?[23]\}?)?")
_UNIT_WORDS = {w: u for u, ws in {
    "mm": "millimeter millimetre", "cm": "centimeter centimetre", "m": "meter metre", "km": "kilometer kilometre",
    "in": "inch inches", "ft": "foot feet", "yd": "yard", "mi": "mile", "mg": "milligram", "g": "gram gm",
    "kg": "kilogram", "lb": "lbs pound", "oz": "ounce", "s": "sec second", "min": "minute mins", "h": "hr hrs hour",
    "day": "", "week": "wk", "year": "yr", "ml": "milliliter millilitre", "l": "liter litre", "$": "dollar",
    "cent": "", "rad": "radian", "mi/h": "mph", "km/h": "kph"}.items() for w in [u, *ws.split()]}


_POWERS = {"square": "^2", "sq": "^2", "sq.": "^2", "squared": "^2", "cubic": "^3", "cubed": "^3"}


def _unit(t):
    """One unit (cm, sq ft, m^2, km/h, miles per hour) in canonical form; None for any other words."""
    out = []
    for part in re.split(r"\s*/\s*|\s+per\s+", t.strip(" ~").lower()):
        m = re.fullmatch(r"(square|sq\.?|cubic)?\s*([a-z]+)\s*(?:\^\s*\{?([23])\}?|(squared|cubed))?", part)
        word = m and (_UNIT_WORDS.get(m[2]) or m[2].endswith("s") and _UNIT_WORDS.get(m[2][:-1]))
        if not word:
            return None
        out.append(word + _POWERS.get(m[1] or m[4], m[3] and "^" + m[3] or ""))
    return "/".join(out)


def units(s):
    """The units an answer names (\\text{ cm}, \\mathrm{kg}, 5 meters, \\$), canonical; other words name none."""
    texts = [m[1] + (m[2] or "") for m in _TEXT.finditer(s)]
    texts += re.findall(r"\d\s*([A-Za-z]+(?:/[A-Za-z]+)?(?:\s*\^\s*\{?[23]\}?)?)\s*\.?\s*$", s.replace("$", ""))
    return {u for u in map(_unit, texts) if u} | ({"$"} if "\\$" in s or "dollar" in s else set())


def increasing(s):
    """A chain of inequalities read with < and <= only: 3 > x >= 1 is 1 <= x < 3, 5 >= x is x <= 5."""
    parts = re.split(r"(<=?|>=?)", s)
    if len(parts) < 3 or any(op[0] != ">" for op in parts[1::2]):
        return s
    return "".join(p if k % 2 == 0 else "<" + p[1:] for k, p in enumerate(reversed(parts)))


def interval(s):
    """x < 2 -> (-\\infty,2), 2 <= x -> [2,\\infty), 3 > x >= 1 -> [1,3): an inequality is an interval."""
    s = re.sub(r"^\\\{[a-z](?:\\in[^|:]*)?[|:](.*[<>].*)\\\}$", r"\1", s)  # {x | x > 3}
    t = increasing(s)
    m = re.fullmatch(r"(.+?)(<=?)[a-z](<=?)(.+)", t)
    if m:
        return "[("[m[2] == "<"] + m[1] + "," + m[4] + "])"[m[3] == "<"]
    m = re.fullmatch(r"[a-z](<=?)([^<>=]+)", t)
    if m:
        return ("(-\\infty,{})", "(-\\infty,{}]")[m[1] == "<="].format(m[2])
    m = re.fullmatch(r"([^<>=]+)(<=?)[a-z]", t)
    if m:
        return ("({},\\infty)", "[{},\\infty)")[m[2] == "<="].format(m[1])
    m = re.fullmatch(r"\|[a-z]([+-][^|<>=]+)?\|(<=?|>=?)([^<>=]+)", s)  # |x - c| < r: from c - r to c + r
    if not m:
        return t  # x + y <= 5 and 5 >= x + y compare as one string
    lo, hi = f"-({m[1] or 0})-({m[3]})", f"-({m[1] or 0})+({m[3]})"
    return {"<": f"({lo},{hi})", "<=": f"[{lo},{hi}]", ">": f"(-\\infty,{lo})\\cup({hi},\\infty)",
            ">=": f"(-\\infty,{lo}]\\cup[{hi},\\infty)"}[m[2]]


_SET_OPS = {"\\cup": "Union", "\\cap": "Intersection", "\\setminus": "Complement", "\\backslash": "Complement",
            "-": "Complement"}


def set_source(s):
    """A set of reals (intervals, \\{..\\}, x ≠ a, {x | ...} joined by \\cup, \\cap, \\setminus) as sympy source."""
    s = re.sub(r"^\\\{[a-z](?:\\in\(-\\infty,\\infty\))?[|:](.*)\\\}$", r"\1", s)  # {x | x ≠ 3}
    src, op = None, "Union"
    for tok in re.split(r"(\\cup|\\cap|\\setminus|\\backslash|(?<=[)\]}])-(?=\\\{))", s):
        if tok in _SET_OPS:
            op = _SET_OPS[tok]
            continue
        tok, m = interval(tok), re.fullmatch(r"[a-z]≠(.+)", tok)
        if m:
            tok = "(-\\infty,\\infty)"
        if tok[:1] in "([" and tok[-1:] in ")]" and len(split_top(tok[1:-1])[0]) == 2:
            ends = [to_python(x) for x in split_top(tok[1:-1])[0]]
            part = f"Interval({ends[0]},{ends[1]},{tok[0] == '('},{tok[-1] == ')'})" if None not in ends else None
        elif tok.startswith("\\{") and tok.endswith("\\}") or tok == "∅":
            items = [y for x in split_top(tok[2:-2])[0] if x and tok != "∅" for y in  # \\{\\pm 2\\} is {2, -2}
                     ((x.replace("\\pm", "+"), x.replace("\\pm", "-")) if "\\pm" in x else (x,))]
            items = [to_python(x) for x in items]
            part = f"FiniteSet({','.join(items)})" if None not in items else None
        else:
            return None
        if part is None or m and to_python(m[1]) is None:
            return None
        part = f"Complement({part},FiniteSet({to_python(m[1])}))" if m else part
        src = part if src is None else f"{op}({src},{part})"
    return src
