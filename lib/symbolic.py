"""The reward's symbolic half: sympy (and, as an option, math-verify) in child processes with a hard deadline.

reward.py settles what it can exactly (strings, numbers, tuples, sets, intervals). An answer pair it
cannot settle goes to sympy_equal(a_src, b_src, places, deadline, mode): the two sides, already
turned into Python source by latex.to_python, are compared by _sympy_check in a persistent worker
process (this file run with --worker): equal expressions, equations up to a nonzero factor, or sets of
reals. math_verify_equal runs the math-verify package's parse and verify there too, since its own
timeouts work only in a main thread. A worker that overruns the deadline is killed and its spare
takes over, so a call returns in time from any thread, whatever the input does; power towers and
huge factorials are refused before evaluation (_digits), while values cheap to hold exactly (2^65536,
1^{10^10}, a sum with a closed form) are computed. Answers are cached.
"""
import atexit, hashlib, importlib, importlib.util, json, math, os, re, select, subprocess, sys, threading, time

from lib.latex import bound, names

STARTUP_TIMEOUT = 30.0  # a new worker imports sympy (~0.3-1 s) once; not counted in the budget
MAX_DIGITS = 100_000  # a value with more digits than this is too expensive to evaluate
CHECKERS = ("hapo", "math_verify")  # reward.py's own rules, or the math-verify package's (published numbers)


def terminates(q):
    """Does p/q have a finite decimal expansion, i.e. is q = 2^a 5^b?"""
    return q == math.gcd(q, 10 ** q.bit_length())


# ---------------------------------------------------------------------------- sympy, in the worker process


def _digits(e):
    """Upper bound on log10|e| (a symbol or constant counts as ~3), so that 9^{9^{9^9}} is never evaluated."""
    if e.is_Rational:
        return math.log10(max(abs(e.p), abs(e.q)))
    if not e.args:
        return 0.5
    name = e.func.__name__
    if name in ("Sum", "Product"):  # n terms, each at most the body's size at the larger end of the range
        body, (v, lo, hi) = e.args[0], e.args[1]
        count, term = max(_digits(lo), _digits(hi)), max(_digits(body.xreplace({v: x})) for x in (lo, hi))
        return term + count + 1 if name == "Sum" else term * 10 ** count if count < 7 else math.inf
    d = [_digits(a) for a in e.args]
    if e.is_Pow or name == "exp":
        (base, dx), x = ((d[0], d[1]), e.exp) if e.is_Pow else ((0.5, d[0]), e.args[0])
        if e.is_Pow and e.base.is_Integer and abs(e.base) <= 1:
            return 0.0  # 0, 1 and -1 to any power stay small: 1^{10^{10}} is cheap
        n = abs(x.p) if x.is_Rational else 10 ** dx if dx < 7 else math.inf  # bound on |exponent|
        return math.inf if n == math.inf else base * n
    if name == "binomial" and len(d) == 2:  # C(n, k) < n^k: C(10^9, 5) is cheap, C(10^12, 10^6) is not
        return math.inf if min(d) > 6 else 10 ** d[1] * d[0]
    if name in ("factorial", "binomial", "gamma"):
        return math.inf if max(d) > 4 else 10 ** max(d) * max(d)
    return sum(d) if e.is_Mul else max(d) + math.log10(len(d)) + 0.5


def _close(va, vb):
    """Equal to 25 significant digits (values are computed to 40)."""
    finite = math.isfinite(abs(va)) and math.isfinite(abs(vb))
    return finite and abs(va - vb) <= 1e-25 * max(abs(va), abs(vb)) + 1e-35


def _values(exprs, syms, sp):
    """The exprs evaluated at a fixed set of "random" points (deterministic rewards), where all are finite."""
    for k in range(3):
        point = {s: sp.Rational(37 + 11 * j + 29 * k, 17 + 3 * j) * (-1) ** (j + k) for j, s in enumerate(syms)}
        try:
            vs = [complex(x.xreplace(point).evalf(40)) for x in exprs]
        except (TypeError, ValueError, OverflowError, ZeroDivisionError):
            continue  # undefined at this point
        if all(math.isfinite(abs(v)) for v in vs):
            yield vs


def _parse(src, sp, closed=True):
    """parse_expr of to_python's source, refusing what would be too large to evaluate; closed: with
    sums and products in closed form where sympy finds one."""
    from sympy.parsing.sympy_parser import (parse_expr, standard_transformations, implicit_multiplication,
                                            rationalize)
    local = {"arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "e": sp.E, "i": sp.I,
             "root": lambda x, n: sp.real_root(x, n) if x.is_number else sp.root(x, n),  # \\sqrt[3]{-8} is -2
             "Sum": lambda v, lo, hi, body: sp.Sum(body, (v, lo, hi)),
             "Product": lambda v, lo, hi, body: sp.Product(body, (v, lo, hi)),
             "gcd": lambda *args: _fold(sp.gcd, args), "lcm": lambda *args: _fold(sp.lcm, args),
             **{f.__name__: _bounded(f) for f in (sp.Max, sp.Min, sp.Mod, sp.floor, sp.ceiling, sp.Abs)}}
    kw = dict(local_dict=local | {n: sp.Symbol(n) for n in names(src) | bound(src)},
              transformations=standard_transformations + (implicit_multiplication, rationalize))
    e = parse_expr(src, evaluate=False, **kw)
    if _digits(e) > MAX_DIGITS:
        raise _TooLarge(e)
    e = parse_expr(src, **kw)
    return e.doit() if closed and e.has(sp.Sum, sp.Product) else e  # closed forms: \sum_{k=1}^{10^{12}} k


def _bounded(f):
    """f, refusing arguments too large to evaluate before it sees them: building Max(9^{9^{9^9}}, 1)
    or Mod(2^{10^{12}}, 7) compares or reduces its arguments, even unevaluated."""
    def call(*args, **kw):
        if max(map(_digits, args)) > MAX_DIGITS:
            raise _TooLarge(args[0])
        return f(*args, **kw)
    return call


def _fold(f, args):
    """gcd or lcm of any number of arguments, refusing arguments too large to evaluate first."""
    if max(map(_digits, args)) > MAX_DIGITS:
        raise _TooLarge(args[0])
    out = args[0].doit()
    for x in args[1:]:
        out = f(out, x.doit())
    return out


class _TooLarge(ValueError):
    """A value too large to evaluate; args[0] is it, unevaluated."""


def _huge_equal(a, b, sp):
    """b^x == c^y for values too large to compute: b and c powers of one integer r > 1, and the
    exponents equal once written over r (2^{2^{16}} == 4^{2^{15}}, 3^{3^{27}} == 3^{7625597484987})."""
    if not (a.is_Pow and b.is_Pow and all(x.base.is_Integer and x.base > 1 for x in (a, b))):
        return False
    (r, k), (s, m) = (sp.perfect_power(x.base) or (x.base, 1) for x in (a, b))
    x, y = sp.Mul(k, a.exp, evaluate=False), sp.Mul(m, b.exp, evaluate=False)
    if r != s:
        return False
    if max(_digits(x), _digits(y)) <= MAX_DIGITS:
        return x.doit() == y.doit()
    return k == m and _huge_equal(a.exp, b.exp, sp)


def _sequence_equal(a_src, b_src, sp):
    """Sums and products whose limits hold every variable (\\sum_{k=0}^{n} \\binom{n}{k} against 2^n) compared
    as sequences, at n = 2, 3, 4, 5, 7, 10: each value is a short finite sum, where Sum.doit() may look
    for a closed form for seconds. None where this reading does not apply."""
    a, b = _parse(a_src, sp, closed=False), _parse(b_src, sp, closed=False)
    big = [x for e in (a, b) for x in e.atoms(sp.Sum, sp.Product)]
    free = sorted(a.free_symbols | b.free_symbols, key=str)
    in_limits = set().union(*(lim.free_symbols for x in big for _, *ends in x.limits for lim in ends))
    if not big or not free or not set(free) <= in_limits:
        return None
    for t in (2, 3, 4, 5, 7, 10):
        point = {s: sp.Integer(t + 3 * j) for j, s in enumerate(free)}
        ends = [lim.xreplace(point) for x in big for _, *lims in x.limits for lim in lims]
        if not all(e.is_Integer and abs(e) <= 1000 for e in ends):
            return None  # \sum_{k=1}^{n^n}: too many terms to add up
        va, vb = (x.xreplace(point) for x in (a, b))
        if max(_digits(va), _digits(vb)) > MAX_DIGITS:
            return None
        va, vb = va.doit(), vb.doit()
        if not (va.is_number and vb.is_number):
            return None
        if va != vb and not _close(complex(va.evalf(40)), complex(vb.evalf(40))):
            return False
    return True


def _sympy_check(mode, a_src, b_src, places):
    """Is expr(a) == expr(b) (mode "equal"), is a = 0 the equation b = 0 ("ratio"), or are the sets of
    reals a and b equal ("set")? Runs in the worker, where a hang costs a restart rather than a run."""
    import sympy as sp
    if mode == "equal" and re.search(r"\b(?:Sum|Product)\b", a_src + b_src):
        try:
            verdict = _sequence_equal(a_src, b_src, sp)
        except _TooLarge:
            verdict = None
        if verdict is not None:
            return verdict
    try:
        a, b = _parse(a_src, sp), _parse(b_src, sp)
    except _TooLarge:
        parsed = []
        for src in (a_src, b_src):
            try:
                parsed.append(_parse(src, sp))
            except _TooLarge as e:
                parsed.append(e.args[0])
        return mode == "equal" and _huge_equal(*parsed, sp)
    if mode == "set":
        return a == b or sp.Complement(a, b) == sp.S.EmptySet == sp.Complement(b, a)
    if mode == "ratio":  # clear denominators, then a/b must be one nonzero constant everywhere
        a, b = (sp.fraction(sp.together(x))[0] for x in (a, b))
        if a.free_symbols != b.free_symbols or not a.free_symbols:
            return False
        ratios = [r for r, in _values([a / b], sorted(a.free_symbols, key=str), sp)]  # to 40 digits
        if len(ratios) >= 2:
            return abs(ratios[0]) > 1e-30 and all(_close(r, ratios[0]) for r in ratios)
        r = sp.cancel(a / b)
        return not r.free_symbols and r != 0
    diff = a - b
    if a == b or diff == 0:
        return True
    if not a.free_symbols and not b.free_symbols:  # numbers: a rounded gold decimal may accept an inexact one
        va, vb = complex(a.evalf(40)), complex(b.evalf(40))
        return not diff.is_Rational and _close(va, vb) or places > 0 and abs(va - vb) <= 0.5 * 10.0 ** -places \
            and not (a.is_Rational and terminates(a.q))
    agree = 0
    syms = sorted(a.free_symbols | b.free_symbols, key=str)  # x^2/2 + C - (x^2/3 + C) has lost C, a and b have not
    for va, vb in _values([a, b], syms, sp):
        if not _close(va, vb):
            return False
        agree += 1
    return agree > 0 or sp.simplify(diff) == 0


def _math_verify(completion, gold):
    """math-verify's own verdict: verify(parse(gold), parse(completion)), its signal timeouts off."""
    from math_verify import parse, verify
    gold = gold if "$" in gold or "\\boxed" in gold else f"${gold}$"
    return verify(parse(gold, parsing_timeout=None), parse(completion, parsing_timeout=None), timeout_seconds=None)


def _worker_main(preload):
    """The worker's loop: one JSON request per line in ([mode, a, b, places], ["mv", completion, gold]
    or ["load", module]), "1" or "0" per line out."""
    import sympy  # the slow import, once per worker
    k, n = sympy.symbols("k n")
    sympy.Sum(k, (k, 1, n)).doit()  # imports summation and simplify's modules (~1 s) before any budget runs
    for module in preload:
        importlib.import_module(module)
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request[0] == "load":
                ok = importlib.import_module(request[1]) is not None
            else:
                ok = _math_verify(*request[1:]) if request[0] == "mv" else _sympy_check(*request)
        except Exception:
            ok = False
        print(int(bool(ok)), flush=True)


# ---------------------------------------------------------------------------- sympy, from the caller


class _Worker:
    """A child python answering requests over pipes. Killed when it overruns a deadline."""

    def __init__(self):
        self.loaded = set(_preload)  # modules imported at start-up, besides sympy
        self.proc = subprocess.Popen([sys.executable, "-m", "lib.symbolic", "--worker", *sorted(self.loaded)], cwd=_ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
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

    def ask(self, request, deadline, needs=()):
        t = time.monotonic()
        self.ready = self.ready or self.readline(STARTUP_TIMEOUT) == "ready"
        for module in sorted(set(needs) - self.loaded):  # an import is start-up too
            self.proc.stdin.write(json.dumps(["load", module]).encode() + b"\n")
            if not self.ready or self.readline(STARTUP_TIMEOUT) != "1":
                return None
            self.loaded.add(module)
        deadline.end += time.monotonic() - t  # start-up is outside the budget, for the whole call
        if self.ready:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            return self.readline(deadline.end - time.monotonic())

    def kill(self):
        _live.discard(self)
        self.proc.kill()
        self.proc.wait()


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the worker runs -m lib.symbolic from here
_live, _idle, _lock, _cache, _preload = set(), [], threading.Lock(), {}, set()


def _forget_workers():  # a forked child must not talk over its parent's pipes, nor hold them open
    global _lock
    for w in _live:
        w.proc.stdin.close(), w.proc.stdout.close()
    _live.clear(), _idle.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)
atexit.register(lambda: [w.kill() for w in list(_live)])


def preload(module):
    """Have every worker started from now on import module at start-up (math_verify, once asked for)."""
    _preload.add(module)


def check_checker(name):
    """Raise, in one line, unless name is a checker that can run here; returns name. Call it at start-up."""
    if name not in CHECKERS:
        raise ValueError(f"unknown checker {name!r}: choose one of {', '.join(CHECKERS)}")
    if name == "math_verify":
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("checker 'math_verify' needs the math-verify package: pip install math-verify")
        preload("math_verify")  # workers started from now on import it before their first request
    return name


def warm_spare(first=False):
    """Keep an idle worker starting or ready (with first, only if there is none at all), so that sympy's
    import overlaps with other work and a killed worker has a successor at once."""
    with _lock:
        if not (_live if first else _idle):
            try:
                _idle.append(_Worker())
            except OSError:
                pass  # no interpreter to start: the sympy path will answer False


class Deadline:
    """When one reward call's sympy budget runs out; time spent waiting for a worker to start is added back."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds


def _ask(request, deadline, needs=()):
    """One request to a worker, with a hard deadline (a Deadline, or a time.monotonic() value); False
    when it cannot answer in time."""
    deadline = deadline if isinstance(deadline, Deadline) else Deadline(deadline - time.monotonic())
    key = tuple(request) if sum(map(len, map(str, request))) < 2000 else \
        hashlib.blake2b(json.dumps(request).encode()).digest()  # long completions: keep the cache small
    if (hit := _cache.get(key)) is not None:  # .get: another thread may be clearing it
        return hit
    if deadline.end - time.monotonic() < 0.05:
        return False  # too little time left to be worth a restart
    with _lock:
        w = _idle.pop() if _idle else None
    warm_spare()
    try:
        w = w or _Worker()
        answer = w.ask(request, deadline, needs)
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


def sympy_equal(a_src, b_src, places, deadline, mode="equal"):
    """_sympy_check in a worker: mode "equal" (expressions), "ratio" (equations a = 0, b = 0) or "set"."""
    return _ask([mode, a_src, b_src, places], deadline)


def math_verify_equal(completion, gold, deadline):
    """math-verify's verdict on completion against gold, computed in a worker under the deadline."""
    return _ask(["mv", completion, gold], deadline, needs=("math_verify",))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(sys.argv[2:])
