"""Worked math problems for the suite's math domain (written for flashhead-mlx, MIT): each kind
of problem belongs to one split only, so no held-out sentence pattern is in the dev split."""

import math
import random
from fractions import Fraction


def frac(x: Fraction) -> str:
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def signed(c, var: str = "", first: bool = False) -> str:
    """A term ``c var`` with its sign, for sums written left to right."""
    c = Fraction(c)
    body = ("" if abs(c) == 1 and var else frac(abs(c))) + var
    if first:
        return ("-" if c < 0 else "") + body
    return (" - " if c < 0 else " + ") + body


def poly(coefs, var: str = "x") -> str:
    """``coefs`` from the highest power down."""
    n = len(coefs) - 1
    terms = [(c, n - i) for i, c in enumerate(coefs) if c]
    out = ""
    for j, (c, p) in enumerate(terms):
        v = "" if p == 0 else var if p == 1 else f"{var}^{{{p}}}"
        out += signed(c, v, first=j == 0) if v else signed(c, "", first=j == 0)
    return out or "0"


def linear(rng):
    a, b, x = rng.choice([2, 3, 4, 5, 7, 9]), rng.randint(-20, 20), rng.randint(-12, 12)
    c = a * x + b
    name = rng.choice(["Solve for $x$", "Find the value of $x$ that satisfies", "Solve the equation"])
    return (
        f"{name}: ${a}x{signed(b)} = {c}$.\n\n"
        f"Move the constant term to the right-hand side: ${a}x = {c}{signed(-b)} = {c - b}$. "
        f"Dividing both sides by ${a}$ gives $x = {frac(Fraction(c - b, a))}$.\n\n"
        f"Check: ${a} \\cdot ({x}){signed(b)} = {a * x + b}$, as required. "
        f"**Answer:** $x = {x}$."
    )


def system(rng):
    x, y = rng.randint(-6, 9), rng.randint(-6, 9)
    a, b, d, e = (rng.choice([1, 2, 3, 4, 5, -1, -2, -3]) for _ in range(4))
    while a * e - b * d == 0:
        e += 1
    c, f = a * x + b * y, d * x + e * y
    det = a * e - b * d
    return (
        "Solve the system of equations\n\n$$\\begin{aligned}\n"
        f"{poly([a])}x{signed(b, 'y')} &= {c} \\\\\n{poly([d])}x{signed(e, 'y')} &= {f}\n"
        "\\end{aligned}$$\n\n"
        f"By Cramer's rule the determinant of the coefficient matrix is "
        f"$D = ({a})({e}) - ({b})({d}) = {det}$, which is not zero, so the solution is unique. "
        f"Then $D_x = ({c})({e}) - ({b})({f}) = {c * e - b * f}$ and "
        f"$D_y = ({a})({f}) - ({c})({d}) = {a * f - c * d}$, so\n\n"
        f"$$x = \\frac{{D_x}}{{D}} = {frac(Fraction(c * e - b * f, det))}, \\qquad "
        f"y = \\frac{{D_y}}{{D}} = {frac(Fraction(a * f - c * d, det))}.$$\n\n"
        f"Substituting back: ${a}({x}) + ({b})({y}) = {c}$ and ${d}({x}) + ({e})({y}) = {f}$."
    )


def quadratic(rng):
    r1, r2, a = rng.randint(-9, 9), rng.randint(-9, 9), rng.choice([1, 1, 2, 3])
    b, c = -a * (r1 + r2), a * r1 * r2
    disc = b * b - 4 * a * c
    return (
        f"Find the roots of ${poly([a, b, c])} = 0$.\n\n"
        f"Here $a = {a}$, $b = {b}$ and $c = {c}$. The discriminant is "
        f"$\\Delta = b^2 - 4ac = {b * b} - {4 * a * c} = {disc}$"
        + (", so there is one double root." if disc == 0 else ", which is positive, so there are two real roots.")
        + f" By the quadratic formula,\n\n$$x = \\frac{{-b \\pm \\sqrt{{\\Delta}}}}{{2a}} = "
        f"\\frac{{{-b} \\pm {math.isqrt(disc)}}}{{{2 * a}}},$$\n\n"
        f"that is $x_1 = {max(r1, r2)}$ and $x_2 = {min(r1, r2)}$. Vieta's formulas agree: "
        f"$x_1 + x_2 = {r1 + r2} = -b/a$ and $x_1 x_2 = {r1 * r2} = c/a$."
    )


def derivative(rng):
    coefs = [rng.randint(-7, 7) or 1 for _ in range(rng.randint(3, 5))]
    n = len(coefs) - 1
    d = [c * (n - i) for i, c in enumerate(coefs[:-1])]
    x0 = rng.randint(-3, 3)
    value = sum(c * x0 ** (len(d) - 1 - i) for i, c in enumerate(d))
    return (
        f"Differentiate $f(x) = {poly(coefs)}$ and evaluate $f'({x0})$.\n\n"
        "The derivative of $x^n$ is $n x^{n-1}$, and differentiation is linear, so term by term\n\n"
        f"$$f'(x) = {poly(d)}.$$\n\n"
        f"At $x = {x0}$: $f'({x0}) = {value}$. "
        + ("The tangent line there is horizontal." if value == 0 else
           f"The function is {'increasing' if value > 0 else 'decreasing'} at that point.")
    )


def integral(rng):
    coefs = [rng.randint(-5, 6) or 2 for _ in range(rng.randint(2, 4))]
    lo, hi = sorted(rng.sample(range(-3, 5), 2))
    n = len(coefs) - 1
    anti = [Fraction(c, n - i + 1) for i, c in enumerate(coefs)] + [0]
    F = lambda t: sum(c * Fraction(t) ** (len(anti) - 1 - i) for i, c in enumerate(anti))
    return (
        f"Compute $\\displaystyle\\int_{{{lo}}}^{{{hi}}} \\left({poly(coefs)}\\right)\\,dx$.\n\n"
        f"An antiderivative is $F(x) = {poly(anti)}$ (check by differentiating). "
        f"By the fundamental theorem of calculus the integral equals $F({hi}) - F({lo}) = "
        f"{frac(F(hi))} - \\left({frac(F(lo))}\\right) = {frac(F(hi) - F(lo))}$."
    )


def arithmetic_series(rng):
    a, d, n = rng.randint(-10, 20), rng.randint(1, 9), rng.randint(8, 60)
    last = a + (n - 1) * d
    return (
        f"What is the sum of the first {n} terms of the arithmetic sequence "
        f"${a}, {a + d}, {a + 2 * d}, \\dots$?\n\n"
        f"The common difference is $d = {d}$, so the {n}th term is "
        f"$a_{{{n}}} = {a} + ({n} - 1) \\cdot {d} = {last}$. Pairing the first term with the last, "
        f"the second with the second to last, and so on, every pair sums to ${a + last}$, so\n\n"
        f"$$S_{{{n}}} = \\frac{{n (a_1 + a_n)}}{{2}} = \\frac{{{n} \\cdot {a + last}}}{{2}} = {n * (a + last) // 2}.$$"
    )


def euclid(rng):
    g = rng.choice([3, 4, 6, 7, 8, 9, 12, 14, 15, 18, 21])
    a, b = g * rng.randint(5, 60), g * rng.randint(5, 60)
    a, b = max(a, b), min(a, b)
    lines, x, y = [], a, b
    while y:
        lines.append(f"${x} = {x // y} \\cdot {y} + {x % y}$")
        x, y = y, x % y
    return (
        f"Use the Euclidean algorithm to find $\\gcd({a}, {b})$.\n\n"
        "Divide repeatedly, replacing the pair by the divisor and the remainder:\n\n"
        + "\n".join(f"- {line}" for line in lines)
        + f"\n\nThe last nonzero remainder is ${x}$, so $\\gcd({a}, {b}) = {x}$ and "
        f"$\\operatorname{{lcm}}({a}, {b}) = {a} \\cdot {b} / {x} = {a * b // x}$."
    )


def percent(rng):
    old, change = rng.randint(20, 900), rng.choice([-35, -20, -12, -5, 4, 8, 15, 25, 40, 60])
    new = Fraction(old * (100 + change), 100)
    item = rng.choice(["a bicycle", "a monthly rent", "a train ticket", "a laptop", "a concert ticket"])
    return (
        f"The price of {item} {'rose' if change > 0 else 'fell'} by {abs(change)}% from {old} euros. "
        f"What is the new price, and what change would bring it back?\n\n"
        f"The new price is ${old} \\times {frac(Fraction(100 + change, 100))} = {float(new):g}$ euros. "
        f"To return to {old} euros the price must change by a factor of "
        f"${old} / {float(new):g} \\approx {old / float(new):.4f}$, that is by "
        f"{100 * (old / float(new) - 1):+.2f}%: a rise of {abs(change)}% is not undone by a "
        f"fall of {abs(change)}%, because the second percentage applies to a different base."
    )


def dice(rng):
    target = rng.randint(3, 11)
    ways = sum(1 for i in range(1, 7) for j in range(1, 7) if i + j == target)
    at_least = sum(1 for i in range(1, 7) for j in range(1, 7) if i + j >= target)
    return (
        f"Two fair six-sided dice are rolled. What is the probability that the sum is {target}, "
        f"and that it is at least {target}?\n\n"
        "There are $6 \\times 6 = 36$ equally likely outcomes. The pairs with sum "
        f"{target} are "
        + ", ".join(f"$({i},{target - i})$" for i in range(1, 7) if 1 <= target - i <= 6)
        + f", so $P(S = {target}) = {frac(Fraction(ways, 36))}$. Counting the outcomes with "
        f"$S \\ge {target}$ gives {at_least}, so $P(S \\ge {target}) = {frac(Fraction(at_least, 36))}$."
    )


def matrix(rng):
    a, b, c, d = (rng.randint(-6, 7) for _ in range(4))
    det = a * d - b * c
    if det == 0:
        d += 1
        det = a * d - b * c
    inv = [[Fraction(d, det), Fraction(-b, det)], [Fraction(-c, det), Fraction(a, det)]]
    return (
        f"Find the determinant and the inverse of $A = \\begin{{pmatrix}} {a} & {b} \\\\ {c} & {d} "
        "\\end{pmatrix}$.\n\n"
        f"$\\det A = ({a})({d}) - ({b})({c}) = {det}$. Since it is nonzero, $A$ is invertible, and "
        "for a $2 \\times 2$ matrix we swap the diagonal, negate the off-diagonal and divide by the "
        "determinant:\n\n"
        f"$$A^{{-1}} = \\frac{{1}}{{{det}}} \\begin{{pmatrix}} {d} & {-b} \\\\ {-c} & {a} \\end{{pmatrix}} = "
        f"\\begin{{pmatrix}} {frac(inv[0][0])} & {frac(inv[0][1])} \\\\ {frac(inv[1][0])} & "
        f"{frac(inv[1][1])} \\end{{pmatrix}}.$$\n\n"
        "Multiplying $A A^{-1}$ gives the identity matrix, as it must."
    )


def interest(rng):
    p, r, n = rng.choice([500, 1000, 2500, 8000]), rng.choice([2, 3, 4.5, 5, 6]), rng.randint(3, 20)
    value = p * (1 + r / 100) ** n
    return (
        f"An amount of {p} dollars is invested at {r}% interest per year, compounded annually. "
        f"How much is it worth after {n} years?\n\n"
        f"Each year multiplies the balance by $1 + {r}/100 = {1 + r / 100:g}$, so after {n} years "
        f"it is ${p} \\times {1 + r / 100:g}^{{{n}}} \\approx {value:,.2f}$ dollars. Simple interest "
        f"would give only ${p} \\times (1 + {n} \\times {r / 100:g}) = {p * (1 + n * r / 100):,.2f}$; "
        f"the difference, {value - p * (1 + n * r / 100):,.2f} dollars, is interest earned on interest."
    )


def geometric(rng):
    a, r = rng.randint(1, 9), Fraction(rng.choice([1, 2, 3]), rng.choice([2, 3, 4, 5]))
    if r >= 1:
        r = Fraction(1, 2)
    n = rng.randint(4, 10)
    s_n = a * (1 - r ** n) / (1 - r)
    return (
        f"Consider the geometric series with first term ${a}$ and ratio $r = {frac(r)}$. "
        f"Find the sum of its first {n} terms and the sum of the whole series.\n\n"
        f"The partial sums of a geometric series satisfy $S_n (1 - r) = a (1 - r^n)$, because "
        f"multiplying by $r$ shifts every term one place. Hence\n\n"
        f"$$S_{{{n}}} = {a} \\cdot \\frac{{1 - ({frac(r)})^{{{n}}}}}{{1 - {frac(r)}}} = {frac(s_n)}.$$\n\n"
        f"Since $|r| < 1$, $r^n \\to 0$ and the series converges to "
        f"$\\frac{{a}}{{1 - r}} = {frac(a / (1 - r))}$; the first {n} terms already come within "
        f"${frac(a / (1 - r) - s_n)}$ of it."
    )


def modpow(rng):
    base, exp, mod = rng.randint(2, 19), rng.randint(20, 300), rng.choice([7, 11, 13, 17, 19, 23, 29, 31])
    bits = bin(exp)[2:]
    squares, value = [], base % mod
    for i in range(len(bits)):
        squares.append(f"${base}^{{{2 ** i}}} \\equiv {value} \\pmod{{{mod}}}$")
        value = value * value % mod
    return (
        f"Compute ${base}^{{{exp}}} \\bmod {mod}$ by repeated squaring.\n\n"
        f"In binary, ${exp} = {bits}_2$. Squaring repeatedly:\n\n"
        + "; ".join(squares)
        + f".\n\nMultiplying the powers that correspond to the ones in the binary expansion gives "
        f"${base}^{{{exp}}} \\equiv {pow(base, exp, mod)} \\pmod{{{mod}}}$. As a check, Fermat's "
        f"little theorem says ${base}^{{{mod - 1}}} \\equiv 1$ when {mod} does not divide {base}, so "
        f"only the exponent modulo {mod - 1}, namely {exp % (mod - 1)}, matters."
    )


def binomial(rng):
    n, k = rng.randint(5, 12), None
    k = rng.randint(1, n - 1)
    p = Fraction(rng.choice([1, 1, 2, 3]), rng.choice([4, 5, 6, 10]))
    prob = math.comb(n, k) * p ** k * (1 - p) ** (n - k)
    thing = rng.choice(["a free throw", "a seed sprouting", "a component passing inspection", "a coin landing heads"])
    return (
        f"The probability of {thing} is ${frac(p)}$, independently each time. In {n} trials, what "
        f"is the probability of exactly {k} successes?\n\n"
        f"The number of successes follows a binomial distribution $B({n}, {frac(p)})$, so\n\n"
        f"$$P(X = {k}) = \\binom{{{n}}}{{{k}}} \\left({frac(p)}\\right)^{{{k}}} "
        f"\\left({frac(1 - p)}\\right)^{{{n - k}}} = {math.comb(n, k)} \\cdot "
        f"{frac(p ** k)} \\cdot {frac((1 - p) ** (n - k))} \\approx {float(prob):.5f}.$$\n\n"
        f"The expected number of successes is $np = {frac(n * p)}$ and the variance "
        f"$np(1 - p) = {frac(n * p * (1 - p))}$."
    )


def law_of_cosines(rng):
    b, c, angle = rng.randint(3, 15), rng.randint(3, 15), rng.choice([30, 45, 60, 90, 120, 135])
    a = math.sqrt(b * b + c * c - 2 * b * c * math.cos(math.radians(angle)))
    area = 0.5 * b * c * math.sin(math.radians(angle))
    return (
        f"In triangle $ABC$, $b = {b}$, $c = {c}$ and the angle at $A$ is ${angle}^\\circ$. Find "
        "the side $a$ and the area.\n\n"
        f"By the law of cosines, $a^2 = b^2 + c^2 - 2bc\\cos A = {b * b} + {c * c} - {2 * b * c}"
        f"\\cos {angle}^\\circ \\approx {a * a:.4f}$, so $a \\approx {a:.4f}$. The area is "
        f"$\\tfrac12 bc \\sin A = \\tfrac12 \\cdot {b} \\cdot {c} \\cdot \\sin {angle}^\\circ "
        f"\\approx {area:.4f}$."
        + (" Since the angle is right, this is just Pythagoras' theorem." if angle == 90 else "")
    )


def logarithm(rng):
    base, k = rng.choice([2, 3, 5, 10]), rng.randint(2, 5)
    shift = rng.randint(-5, 9)
    x = base ** k - shift
    return (
        f"Solve $\\log_{{{base}}}(x{signed(shift)}) = {k}$.\n\n"
        f"The logarithm is defined only for $x{signed(shift)} > 0$. Rewriting in exponential form, "
        f"$x{signed(shift)} = {base}^{{{k}}} = {base ** k}$, so $x = {x}$, which satisfies the "
        f"domain condition. In natural logarithms the equation reads "
        f"$\\ln(x{signed(shift)}) = {k} \\ln {base}$."
    )


def combinations(rng):
    n, k = rng.randint(6, 20), rng.randint(2, 5)
    group = rng.choice(["students", "volunteers", "players", "books", "colours"])
    return (
        f"In how many ways can {k} {group} be chosen from {n}, if order does not matter? And if it does?\n\n"
        f"Ordered selections: ${n} \\times {n - 1} \\times \\dots \\times {n - k + 1} = "
        f"{math.perm(n, k)}$. Each unordered choice appears ${k}! = {math.factorial(k)}$ times among "
        f"them, so the number of combinations is\n\n$$\\binom{{{n}}}{{{k}}} = "
        f"\\frac{{{n}!}}{{{k}!\\,{n - k}!}} = {math.comb(n, k)}.$$"
    )


def statistics(rng):
    data = sorted(rng.randint(1, 40) for _ in range(rng.randint(5, 9)))
    mean = Fraction(sum(data), len(data))
    var = sum((Fraction(x) - mean) ** 2 for x in data) / (len(data) - 1)
    mid = len(data) // 2
    median = Fraction(data[mid]) if len(data) % 2 else Fraction(data[mid - 1] + data[mid], 2)
    return (
        f"For the data ${', '.join(map(str, data))}$, find the mean, the median and the sample "
        "standard deviation.\n\n"
        f"The mean is $\\bar x = {sum(data)} / {len(data)} = {frac(mean)} \\approx {float(mean):.3f}$. "
        f"The data are already sorted; the median is {frac(median)}. The sample variance is "
        f"$s^2 = \\frac{{1}}{{n - 1}} \\sum (x_i - \\bar x)^2 \\approx {float(var):.3f}$, so "
        f"$s \\approx {math.sqrt(var):.3f}$."
    )


def vectors(rng):
    u = [rng.randint(-5, 5) for _ in range(3)]
    v = [rng.randint(-5, 5) for _ in range(3)]
    if not any(u):
        u[0] = 1
    if not any(v):
        v[1] = 2
    dot = sum(a * b for a, b in zip(u, v))
    nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(b * b for b in v))
    cross = [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]
    return (
        f"Let $\\mathbf u = ({', '.join(map(str, u))})$ and $\\mathbf v = ({', '.join(map(str, v))})$. "
        "Find $\\mathbf u \\cdot \\mathbf v$, the angle between them and $\\mathbf u \\times \\mathbf v$.\n\n"
        f"$\\mathbf u \\cdot \\mathbf v = {dot}$, $\\|\\mathbf u\\| = {nu:.4f}$ and "
        f"$\\|\\mathbf v\\| = {nv:.4f}$, so $\\cos\\theta = {dot / (nu * nv):.4f}$ and "
        f"$\\theta \\approx {math.degrees(math.acos(max(-1, min(1, dot / (nu * nv))))):.2f}^\\circ$. "
        f"The cross product is $({', '.join(map(str, cross))})$, orthogonal to both: its dot "
        f"products with them are {sum(a * b for a, b in zip(cross, u))} and "
        f"{sum(a * b for a, b in zip(cross, v))}."
    )


def factorize(rng):
    primes = [2, 3, 5, 7, 11, 13]
    n = 1
    for _ in range(rng.randint(3, 6)):
        n *= rng.choice(primes)
    factors, m, p = [], n, 2
    while m > 1:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    powers = {f: factors.count(f) for f in sorted(set(factors))}
    divisors = math.prod(e + 1 for e in powers.values())
    return (
        f"Write {n} as a product of primes and count its divisors.\n\n"
        f"Dividing by the smallest prime each time: {' , '.join(str(f) for f in factors)}. So "
        f"${n} = " + " \\cdot ".join(f"{p}^{{{e}}}" if e > 1 else str(p) for p, e in powers.items())
        + f"$. A divisor picks each exponent independently from $0$ up to its value, so {n} has "
        + " \\times ".join(f"({e} + 1)" for e in powers.values()) + f" $= {divisors}$ divisors."
    )


def circle(rng):
    h, k, r = rng.randint(-6, 6), rng.randint(-6, 6), rng.randint(1, 9)
    px, py = h + rng.randint(-10, 10), k + rng.randint(-10, 10)
    dist2 = (px - h) ** 2 + (py - k) ** 2
    where = "inside" if dist2 < r * r else "on" if dist2 == r * r else "outside"
    return (
        f"Write the equation of the circle with centre $({h}, {k})$ and radius {r}, and decide "
        f"whether the point $({px}, {py})$ lies inside it.\n\n"
        f"The circle is $(x{signed(-h)})^2 + (y{signed(-k)})^2 = {r * r}$. The squared distance from "
        f"the centre to the point is $({px - h})^2 + ({py - k})^2 = {dist2}$, compared with "
        f"$r^2 = {r * r}$: the point lies {where} the circle."
    )


def rational_limit(rng):
    a = rng.randint(-5, 5) or 2
    b = rng.randint(-6, 6)
    while b == a:
        b += 1
    c = rng.randint(1, 4)
    return (
        f"Evaluate $\\displaystyle\\lim_{{x \\to {a}}} \\frac{{{poly([c, -c * (a + b), c * a * b])}}}"
        f"{{x{signed(-a)}}}$.\n\n"
        f"Direct substitution gives $0/0$. The numerator vanishes at $x = {a}$, so it has the "
        f"factor $x{signed(-a)}$: ${poly([c, -c * (a + b), c * a * b])} = {c if c > 1 else ''}"
        f"(x{signed(-a)})(x{signed(-b)})$. For $x \\neq {a}$ the quotient equals "
        f"${c if c > 1 else ''}(x{signed(-b)})$, a continuous function, so the limit is "
        f"${c}({a}{signed(-b)}) = {c * (a - b)}$."
    )


KINDS = {
    "dev": [linear, system, quadratic, derivative, integral, arithmetic_series, euclid, percent,
            dice, matrix, interest],
    "held-out": [geometric, modpow, binomial, law_of_cosines, logarithm, combinations,
                 statistics, vectors, factorize, circle, rational_limit],
}


def problems(split: str, tokenizer, target: int) -> str:
    """Numbered worked problems of ``split``'s kinds, up to ``target`` tokens."""
    rng = random.Random(f"flashhead-mlx suite math {split}")
    out, count = [], 0
    while count < target:
        kind = KINDS[split][len(out) % len(KINDS[split])]
        text = f"### Problem {len(out) + 1}\n\n{kind(rng)}"
        out.append(text)
        count += len(tokenizer.encode(text + "\n\n", add_special_tokens=False).ids)
    return "\n\n".join(out) + "\n"
