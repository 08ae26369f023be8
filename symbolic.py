"""The reward's symbolic half: LaTeX to sympy source, and sympy in child processes with a hard deadline.

reward.py settles what it can exactly (strings, numbers, tuples, sets, intervals). An answer pair it
cannot settle goes to sympy_equal(a_src, b_src, places, deadline): the two sides, already turned
into Python source by to_python, are compared by _sympy_check in a persistent worker process (this
file run with --worker). A worker that overruns the deadline is killed and its spare takes over, so
a call returns in time from any thread, whatever sympy does with the input; power towers and huge
factorials are refused before evaluation (_digits). Answers are cached.
"""
import atexit, json, math, os, re, select, subprocess, sys, threading, time

STARTUP_TIMEOUT = 30.0  # a new worker imports sympy (~0.3-1 s) once; not counted in the budget


def terminates(q):
    """Does p/q have a finite decimal expansion, i.e. is q = 2^a 5^b?"""
    return q == math.gcd(q, 10 ** q.bit_length())


# ---------------------------------------------------------------------------- LaTeX -> sympy source


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


_FUNCS = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
          "log", "exp", "sqrt", "root", "Abs", "floor", "ceiling", "binomial", "pi", "oo"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "kappa", "lamda", "mu",
          "nu", "xi", "rho", "sigma", "tau", "phi", "chi", "psi", "omega"}
_COMMANDS = {"infty": "oo", "cdot": "*", "times": "*", "ast": "*", "div": "/", "ln": "log", "lambda": "lamda",
             "varphi": "phi", "varepsilon": "epsilon", "vartheta": "theta", "lfloor": "floor(", "rfloor": ")",
             "lceil": "ceiling(", "rceil": ")"}
_EXPANDED = re.compile(r"\\(frac|sqrt|binom|sin|cos|tan|sec|csc|cot|ln|log|exp)(?![A-Za-z])")


def _arg(s, i):
    """(argument, index after) of a LaTeX argument at s[i]: a brace group, a command or one character."""
    while s[i:i + 1] == " ":
        i += 1
    if s[i:i + 1] == "{":
        return brace_group(s, i) or ("", len(s))
    m = re.match(r"\\[A-Za-z]+|.", s[i:])
    return (m.group(), i + m.end()) if m else ("", i)


def _expand(s):
    """\\frac, \\sqrt, \\binom and functions with a bare argument (\\sin x, \\ln 2) to call syntax."""
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
        elif s[i:i + 1] in "({^":  # \sin(x), \ln{2}: the parser takes it from here
            out.append(f" {_COMMANDS.get(name, name)} ")
        else:
            a = re.match(r" *([\d.]+|[A-Za-z]|\\[A-Za-z]+)", s[i:])
            out.append(f" {_COMMANDS.get(name, name)}({_expand(a[1]) if a else ''})")
            i += a.end() if a else 0
    return "".join(out)


def to_python(s):
    """LaTeX -> source for sympy's parse_expr, or None. Only known names survive, so eval() is safe."""
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
    return s


def names(src):
    """The free symbols of a source string (e and i are constants)."""
    return set(re.findall(r"[A-Za-z]\w*", src)) - _FUNCS - {"e", "i"}


# ---------------------------------------------------------------------------- sympy, in the worker process


def _digits(e):
    """Upper bound on log10|e| (a symbol or constant counts as ~3), so that 9^{9^{9^9}} is never evaluated."""
    if e.is_Rational:
        return math.log10(max(abs(e.p), abs(e.q)))
    if not e.args:
        return 0.5
    d = [_digits(a) for a in e.args]
    if e.is_Pow or e.func.__name__ == "exp":
        (base, dx), x = ((d[0], d[1]), e.exp) if e.is_Pow else ((0.5, d[0]), e.args[0])
        n = abs(x.p) if x.is_Rational else 10 ** dx if dx < 7 else math.inf  # bound on |exponent|
        return math.inf if n == math.inf else base * n
    if e.func.__name__ in ("factorial", "binomial", "gamma"):
        return math.inf if max(d) > 4 else 10 ** max(d) * max(d)
    return sum(d) if e.is_Mul else max(d) + math.log10(len(d)) + 0.5


def _close(va, vb):
    """Equal to 25 significant digits (values are computed to 40)."""
    finite = math.isfinite(abs(va)) and math.isfinite(abs(vb))
    return finite and abs(va - vb) <= 1e-25 * max(abs(va), abs(vb)) + 1e-35


def _sympy_check(a_src, b_src, places):
    """Is expr(a) == expr(b)? Runs in the worker, where a hang costs a restart rather than a run."""
    import sympy as sp
    from sympy.parsing.sympy_parser import (parse_expr, standard_transformations, implicit_multiplication,
                                            rationalize)
    consts = {"arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "root": sp.root, "e": sp.E, "i": sp.I}

    def parse(src):
        kw = dict(local_dict={n: sp.Symbol(n) for n in names(src)} | consts,
                  transformations=standard_transformations + (implicit_multiplication, rationalize))
        if _digits(parse_expr(src, evaluate=False, **kw)) > 5000:
            raise ValueError("too large to evaluate")
        return parse_expr(src, **kw)

    a, b = parse(a_src), parse(b_src)
    diff = a - b
    if a == b or diff == 0:
        return True
    if not a.free_symbols and not b.free_symbols:  # numbers: a rounded gold decimal may accept an inexact one
        va, vb = complex(a.evalf(40)), complex(b.evalf(40))
        return not diff.is_Rational and _close(va, vb) or places > 0 and abs(va - vb) <= 0.5 * 10.0 ** -places \
            and not (a.is_Rational and terminates(a.q))
    if a.free_symbols != b.free_symbols:
        return False
    syms, agree = sorted(diff.free_symbols, key=str), 0
    for k in range(3):  # a fixed set of "random" points keeps the reward deterministic
        point = {s: sp.Rational(37 + 11 * j + 29 * k, 17 + 3 * j) * (-1) ** (j + k) for j, s in enumerate(syms)}
        try:
            va, vb = complex(a.xreplace(point).evalf(40)), complex(b.xreplace(point).evalf(40))
        except (TypeError, ValueError, OverflowError):
            continue  # undefined at this point
        if math.isfinite(abs(va)) and math.isfinite(abs(vb)):
            if not _close(va, vb):
                return False
            agree += 1
    return agree > 0 or sp.simplify(diff) == 0


def _worker_main():
    """The worker's loop: one JSON request [a, b, places] per line in, "1" or "0" per line out."""
    import sympy  # noqa: F401  the slow import, once per worker
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            ok = _sympy_check(*json.loads(line))
        except Exception:
            ok = False
        print(int(ok), flush=True)


# ---------------------------------------------------------------------------- sympy, from the caller


class _Worker:
    """A child python answering _sympy_check over pipes. Killed when it overruns a deadline."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, _HERE, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self.buf, self.ready = b"", False
        _live.add(self)

    def readline(self, timeout):
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))[0]
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                return None  # out of time, or the worker died
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def ask(self, request, timeout):
        self.ready = self.ready or self.readline(STARTUP_TIMEOUT) == "ready"
        if self.ready:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            return self.readline(timeout)

    def kill(self):
        _live.discard(self)
        self.proc.kill()
        self.proc.wait()


_HERE = os.path.abspath(__file__)
_live, _idle, _lock, _cache = set(), [], threading.Lock(), {}


def _forget_workers():  # a forked child must not talk over its parent's pipes, nor hold them open
    global _lock
    for w in _live:
        w.proc.stdin.close(), w.proc.stdout.close()
    _live.clear(), _idle.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)
atexit.register(lambda: [w.kill() for w in list(_live)])


def warm_spare(first=False):
    """Keep an idle worker starting or ready (with first, only if there is none at all), so that sympy's
    import overlaps with other work and a killed worker has a successor at once."""
    with _lock:
        if not (_live if first else _idle):
            try:
                _idle.append(_Worker())
            except OSError:
                pass  # no interpreter to start: the sympy path will answer False


def sympy_equal(a_src, b_src, places, deadline):
    """_sympy_check in a worker, with a hard deadline; False when it cannot answer in time."""
    key = (a_src, b_src, places)
    if (hit := _cache.get(key)) is not None:  # .get: another thread may be clearing it
        return hit
    if deadline - time.monotonic() < 0.05:
        return False  # too little time left to be worth a restart
    with _lock:
        w = _idle.pop() if _idle else None
    warm_spare()
    try:
        w = w or _Worker()
        answer = w.ask(key, deadline - time.monotonic())
    except OSError:  # a broken pipe, or no interpreter to start
        answer = None
    if answer is None:  # it overran (or died): kill it; the spare takes over
        if w is not None:
            w.kill()
        return False
    with _lock:
        _idle.append(w)
    if len(_cache) > 100_000:
        _cache.clear()
    _cache[key] = answer == "1"
    return answer == "1"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
