# Tests for reward.py (Eq. 4). Self-contained: merged into test_hapo.py later.
import os
import subprocess
import sys
import threading
import time

import pytest

from reward import extract_boxed, is_equiv, reward


def box(pred):
    """A realistic completion whose final answer is pred."""
    return ("<think>\nLet me work through this carefully. First we set up the equation, then we solve.\n"
            "</think>\nPutting it together, the final answer is $\\boxed{" + pred + "}$.")


# (category, completion, gold answer, expected reward). Outside "extract", a completion with no box
# is the answer alone, and the test wraps it with box().
CASES = [
    # extraction
    ("extract", "so the answer is \\boxed{5}.", "5", 1.0),
    ("extract", "\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("extract", "The answer is \\boxed 7 and we are done", "7", 1.0),
    ("extract", "$\\fbox{42}$", "42", 1.0),
    ("extract", "first \\boxed{3}, but correcting: \\boxed{4}", "4", 1.0),
    ("extract", "first \\boxed{4}, but correcting: \\boxed{3}", "4", 0.0),
    ("extract", "the answer is 5", "5", 0.0),
    ("extract", "the answer is \\boxed{}", "5", 0.0),
    ("extract", "the answer is \\boxed{5", "5", 0.0),
    ("extract", "<think>maybe \\boxed{6}</think> The answer is \\boxed{8}.", "8", 1.0),
    ("extract", "<think>maybe \\boxed{8}</think> The answer is \\boxed{6}.", "8", 0.0),
    ("extract", "\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),
    ("gold", "5", "\\boxed{5}", 1.0),
    ("gold", "5", "$5$", 1.0),
    ("gold", "5", "$\\boxed{6}$", 0.0),
    ("gold", "\\frac{1}{2}", "$\\frac{1}{2}$", 1.0),
    # integers and negatives
    ("int", "12", "12", 1.0),
    ("int", "012", "12", 1.0),
    ("int", "+12", "12", 1.0),
    ("int", "12", "21", 0.0),
    ("int", "-3", "-3", 1.0),
    ("int", "-3", "3", 0.0),
    ("int", "3", "-3", 0.0),
    ("int", "- 3", "-3", 1.0),
    ("int", "0", "-0", 1.0),
    ("int", "1267650600228229401496703205376", "2^{100}", 1.0),
    ("int", "1267650600228229401496703205377", "2^{100}", 0.0),
    ("int", "10^{6}", "1000000", 1.0),
    # decimals and fractions
    ("frac", "0.5", "\\frac{1}{2}", 1.0),
    ("frac", "\\frac{1}{2}", "0.5", 1.0),
    ("frac", "\\dfrac{1}{2}", "\\frac12", 1.0),
    ("frac", "\\tfrac{3}{4}", "0.75", 1.0),
    ("frac", "3/4", "\\frac{3}{4}", 1.0),
    ("frac", "\\frac{6}{8}", "\\frac{3}{4}", 1.0),
    ("frac", "-\\frac{2}{3}", "\\frac{-2}{3}", 1.0),
    ("frac", "\\frac{-2}{3}", "\\frac{2}{3}", 0.0),
    ("frac", "1/2", "2", 0.0),
    ("frac", "\\frac{2}{1}", "\\frac{1}{2}", 0.0),
    ("frac", "3", "3.5", 0.0),
    ("frac", "3.50", "3.5", 1.0),
    ("frac", "0.333", "\\frac{1}{3}", 0.0),
    ("frac", "0.33", "\\frac{1}{3}", 0.0),
    ("frac", "2\\frac{1}{2}", "\\frac{5}{2}", 1.0),
    ("frac", "\\frac{5}{2}", "2.5", 1.0),
    ("frac", "\\frac{1}{2}", "\\frac{1}{4}", 0.0),
    ("frac", "\\frac{a}{b}", "a/b", 1.0),
    ("frac", "\\frac{b}{a}", "a/b", 0.0),
    ("frac", ".25", "\\frac14", 1.0),
    ("frac", "0.2", "0.25", 0.0),
    # percentages
    ("percent", "50\\%", "50", 1.0),
    ("percent", "50", "50\\%", 1.0),
    ("percent", "0.5", "50\\%", 1.0),
    ("percent", "50%", "50\\%", 1.0),
    ("percent", "25\\%", "50\\%", 0.0),
    ("percent", "5", "50\\%", 0.0),
    # roots, pi, powers
    ("sqrt", "2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("sqrt", "\\sqrt2", "\\sqrt{2}", 1.0),
    ("sqrt", "\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", 1.0),
    ("sqrt", "\\frac{3\\sqrt{2}}{4}", "\\dfrac{3\\sqrt{2}}{4}", 1.0),
    ("sqrt", "\\frac{3}{\\sqrt{8}}", "\\dfrac{3\\sqrt{2}}{4}", 1.0),
    ("sqrt", "\\frac{3\\sqrt{3}}{4}", "\\dfrac{3\\sqrt{2}}{4}", 0.0),
    ("sqrt", "\\sqrt{3}", "3", 0.0),
    ("sqrt", "\\sqrt[3]{8}", "2", 1.0),
    ("sqrt", "\\sqrt[3]{9}", "3", 0.0),
    ("sqrt", "4+2\\sqrt{3}", "(1+\\sqrt{3})^2", 1.0),
    ("sqrt", "4-2\\sqrt{3}", "(1+\\sqrt{3})^2", 0.0),
    ("pi", "2\\pi", "2\\pi", 1.0),
    ("pi", "\\pi \\cdot 2", "2\\pi", 1.0),
    ("pi", "\\frac{\\pi}{6}", "\\frac{1}{6}\\pi", 1.0),
    ("pi", "\\frac{\\pi}{3}", "\\frac{\\pi}{6}", 0.0),
    ("pi", "6.28", "2\\pi", 0.0),
    ("pi", "\\pi r^2", "r^2\\pi", 1.0),
    ("power", "2^{10}", "1024", 1.0),
    ("power", "2^{10}", "1023", 0.0),
    ("power", "x^{2}", "x^2", 1.0),
    ("power", "x^3", "x^2", 0.0),
    ("power", "e^{2}", "\\mathrm{e}^2", 1.0),
    # algebra
    ("algebra", "2x+2", "2(x+1)", 1.0),
    ("algebra", "x+1", "x-1", 0.0),
    ("algebra", "(x+1)^2", "x^2+2x+1", 1.0),
    ("algebra", "(x-1)^2", "x^2+2x+1", 0.0),
    ("algebra", "x^2-1", "(x-1)(x+1)", 1.0),
    ("algebra", "\\frac{x^2-1}{x-1}", "x+1", 1.0),
    ("algebra", "2xy", "2yx", 1.0),
    ("algebra", "2xy", "2x+y", 0.0),
    ("algebra", "x_1 + x_2", "x_{2}+x_{1}", 1.0),
    ("algebra", "\\frac{1}{x}+\\frac{1}{y}", "\\frac{x+y}{xy}", 1.0),
    ("algebra", "\\frac{1}{x+y}", "\\frac{1}{x}+\\frac{1}{y}", 0.0),
    ("algebra", "3a", "3b", 0.0),
    ("algebra", "\\sin^2 x + \\cos^2 x", "1", 0.0),  # unparsed notation fails safe
    ("algebra", "\\sin(2x)", "2\\sin(x)\\cos(x)", 1.0),
    ("algebra", "\\ln 8", "3\\ln 2", 1.0),
    ("algebra", "|x|", "x", 0.0),
    ("algebra", "|-3|", "3", 1.0),
    ("algebra", "x+\\frac{9\\sqrt{2}\\pi}{2}-\\frac{9\\sqrt{6}}{2}", "x-\\frac{9\\sqrt{2}(\\sqrt{3}-\\pi)}{2}", 1.0),
    ("algebra", "x+\\frac{9\\sqrt{2}\\pi}{2}-\\frac{9\\sqrt{6}}{2}", "x-\\frac{9\\sqrt{2}(\\sqrt{3}+\\pi)}{2}", 0.0),
    # equations and "x ="
    ("eq", "x = 3", "3", 1.0),
    ("eq", "3", "x=3", 1.0),
    ("eq", "x = 4", "3", 0.0),
    ("eq", "y = 2x + 1", "y=2x+1", 1.0),
    ("eq", "2x+1", "y=2x+1", 1.0),
    ("eq", "y = 2x - 1", "y=2x+1", 0.0),
    ("eq", "x^2+y^2-4=0", "x^2+y^2=4", 1.0),
    ("eq", "4 = x^2+y^2", "x^2+y^2=4", 1.0),
    ("eq", "x^2+y^2=5", "x^2+y^2=4", 0.0),
    ("eq", "AB = 5", "5", 1.0),
    ("eq", "f(x) = x^2", "x^2", 1.0),
    ("eq", "\\theta = 30^\\circ", "30", 1.0),
    # text, units and degrees
    ("units", "12\\text{ cm}", "12", 1.0),
    ("units", "12 \\text{cm}^2", "12", 1.0),
    ("units", "12\\text{ cm}", "13", 0.0),
    ("units", "12 \\mbox{ inches}", "12", 1.0),
    ("units", "5 dollars", "5", 1.0),
    ("units", "\\$5", "5", 1.0),
    ("units", "\\$5.50", "5.5", 1.0),
    ("units", "12 cm", "12", 1.0),
    ("units", "4 \\text{ square units}", "4", 1.0),
    ("units", "30^\\circ", "30", 1.0),
    ("units", "30^{\\circ}", "30^\\circ", 1.0),
    ("units", "30^\\circ", "60", 0.0),
    ("units", "45°", "45", 1.0),
    ("units", "\\text{no solution}", "\\text{No solution}", 1.0),
    ("units", "\\text{yes}", "\\text{no}", 0.0),
    ("units", "5 \\text{ and } 7", "5, 7", 1.0),
    ("units", "x=5 \\text{ or } x=7", "5, 7", 1.0),
    ("units", "5 \\text{ or } 8", "5, 7", 0.0),
    # thousands separators
    ("thousands", "1,000", "1000", 1.0),
    ("thousands", "1000", "1,000", 1.0),
    ("thousands", "1{,}000", "1000", 1.0),
    ("thousands", "1\\,000", "1000", 1.0),
    ("thousands", "1,234,567", "1234567", 1.0),
    ("thousands", "(1, 000)", "1000", 0.0),
    ("thousands", "1, 000", "1000", 0.0),
    ("thousands", "1,000", "100", 0.0),
    ("thousands", "10,000", "1000", 0.0),
    # intervals
    ("interval", "(-\\infty, 2]", "(-\\infty,2]", 1.0),
    ("interval", "\\left(-\\infty, 2\\right]", "(-\\infty,2]", 1.0),
    ("interval", "(-\\infty, 2)", "(-\\infty,2]", 0.0),
    ("interval", "[0,1)", "[0,1]", 0.0),
    ("interval", "[0,1]", "[0,1)", 0.0),
    ("interval", "[0, 1]", "[0,1]", 1.0),
    ("interval", "(0, \\frac{1}{2}]", "(0, 0.5]", 1.0),
    ("interval", "(0, \\frac{1}{2}]", "(0, 0.25]", 0.0),
    ("interval", "x \\le 2", "(-\\infty, 2]", 1.0),
    ("interval", "x < 2", "(-\\infty, 2]", 0.0),
    ("interval", "1 \\leq x < 3", "[1, 3)", 1.0),
    ("interval", "x \\geq 1", "[1, \\infty)", 1.0),
    ("interval", "(-\\infty,1)\\cup(2,\\infty)", "(-\\infty, 1) \\cup (2, \\infty)", 1.0),
    ("interval", "(2,\\infty)\\cup(-\\infty,1)", "(-\\infty, 1) \\cup (2, \\infty)", 1.0),
    ("interval", "(-\\infty,1]\\cup(2,\\infty)", "(-\\infty, 1) \\cup (2, \\infty)", 0.0),
    ("interval", "\\mathbb{R}", "(-\\infty, \\infty)", 1.0),
    # tuples, sets and lists of answers
    ("tuple", "(1, 2)", "(1,2)", 1.0),
    ("tuple", "(2, 1)", "(1,2)", 0.0),
    ("tuple", "(1, 2, 3)", "(1,2)", 0.0),
    ("tuple", "(\\frac{1}{2}, -3)", "(0.5, -3)", 1.0),
    ("tuple", "(1, 2)", "[1,2]", 0.0),
    ("tuple", "x=1, y=2", "(1, 2)", 1.0),
    ("tuple", "(3, 4)", "3, 4", 1.0),
    ("set", "\\{1, 2\\}", "\\{2,1\\}", 1.0),
    ("set", "\\{1, 2\\}", "\\{1,3\\}", 0.0),
    ("set", "2, 3", "3, 2", 1.0),
    ("set", "2, 3", "\\{2, 3\\}", 1.0),
    ("set", "2, 3", "2, 3, 4", 0.0),
    ("set", "2", "2, 3", 0.0),
    ("set", "-2, 1", "1,-2", 1.0),
    ("set", "\\pm 2", "2, -2", 1.0),
    ("set", "3 \\pm \\sqrt{2}", "3-\\sqrt{2}, 3+\\sqrt{2}", 1.0),
    ("set", "\\pm 2", "2", 0.0),
    ("set", "\\{5\\}", "5", 1.0),
    ("set", "\\emptyset", "\\varnothing", 1.0),
    ("set", "\\emptyset", "0", 0.0),
    # matrices
    ("matrix", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0),
    ("matrix", "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", 0.0),
    ("matrix", "\\begin{pmatrix} \\frac{1}{2} \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix}0.5\\\\3\\end{pmatrix}", 1.0),
    # formatting noise: \left \right \! \, trailing periods, display delimiters
    ("format", "\\left( 1, 2 \\right)", "(1,2)", 1.0),
    ("format", "1\\!000", "1000", 1.0),
    ("format", "\\frac{1}{2}.", "\\frac{1}{2}", 1.0),
    ("format", "7.", "7", 1.0),
    ("format", "\\displaystyle\\frac{1}{2}", "0.5", 1.0),
    ("format", "\\( 7 \\)", "7", 1.0),
    ("format", "\\, 7 \\;", "7", 1.0),
    ("format", "\\mathbf{7}", "7", 1.0),
    ("format", "\\textbf{8}", "7", 0.0),
    ("format", "\u22123", "-3", 1.0),
    # multiple choice
    ("choice", "A", "A", 1.0),
    ("choice", "\\text{(C)}", "C", 1.0),
    ("choice", "(C)", "C", 1.0),
    ("choice", "C", "(C)", 1.0),
    ("choice", "\\textbf{(C) } 12", "C", 1.0),
    ("choice", "\\text{(B)}", "C", 0.0),
    ("choice", "D", "C", 0.0),
    ("choice", "CD", "C", 0.0),
    # rounded decimal golds
    ("rounding", "\\sqrt{2}", "1.41", 1.0),
    ("rounding", "\\frac{1}{3}", "0.33", 1.0),
    ("rounding", "\\frac{12}{25}", "0.5", 0.0),
    ("rounding", "\\frac{12}{25}", "0.49", 0.0),
    ("rounding", "\\sqrt{3}", "1.41", 0.0),
    ("rounding", "1.42", "1.41", 0.0),
    # a mix of realistic answer pairs
    ("mixed", "\\dfrac{3\\sqrt{2}}{4}", "\\frac{3\\sqrt2}{4}", 1.0),
    ("mixed", "\\frac{3}{2\\sqrt{2}}", "\\frac{3\\sqrt2}{4}", 1.0), ("mixed", "(-\\infty, 2]", "(-\\infty,2)", 0.0),
    ("mixed", "x\\in(-\\infty,2]", "(-\\infty,2]", 1.0), ("mixed", "x^2+2x+1", "(x+1)^2", 1.0),
    ("mixed", "x^2+2x+1", "x^2+2x-1", 0.0), ("mixed", "12 \\text{ cm}^2", "12", 1.0),
    ("mixed", "12\\,\\text{cm}", "12", 1.0), ("mixed", "12 \\mathrm{~cm}", "12", 1.0),
    ("mixed", "\\{1,2\\}", "\\{1,2\\}", 1.0), ("mixed", "\\{1,2\\}", "1,2", 1.0),
    ("mixed", "2, 3", "2,3", 1.0), ("mixed", "2, 3", "3,2", 1.0),
    ("mixed", "2,3", "2", 0.0), ("mixed", "\\text{(C)}", "\\text{(C)}", 1.0),
    ("mixed", "\\textbf{(D)}", "C", 0.0), ("mixed", "\\mathrm{(C)}", "C", 1.0),
    ("mixed", "C", "\\text{(C)}", 1.0), ("mixed", "B", "\\text{(C)}", 0.0),
    ("mixed", "\\frac{1}{2}", "\\frac12", 1.0), ("mixed", "0.5", "\\frac12", 1.0),
    ("mixed", "\\frac{2}{4}", "\\frac12", 1.0), ("mixed", "6-5i", "6 - 5i", 1.0),
    ("mixed", "-5i+6", "6-5i", 1.0), ("mixed", "6+5i", "6-5i", 0.0),
    ("mixed", "\\$18.90", "18.90", 1.0), ("mixed", "18.9", "\\$18.90", 1.0),
    ("mixed", "18.99", "\\$18.90", 0.0), ("mixed", "\\text{Evelyn}", "\\text{Evelyn}", 1.0),
    ("mixed", "Evelyn", "\\text{Evelyn}", 1.0), ("mixed", "\\text{Bob}", "\\text{Evelyn}", 0.0),
    ("mixed", "033", "33", 1.0), ("mixed", "33", "330", 0.0),
    ("mixed", "1{,}000{,}000", "1000000", 1.0),
    ("mixed", "\\frac{-1 \\pm \\sqrt{5}}{2}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", 1.0),
    ("mixed", "\\frac{-1 + \\sqrt{5}}{2}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", 0.0),
    ("mixed", "(1,2),(2,1)", "(2,1),(1,2)", 1.0), ("mixed", "(\\frac12,1),(2,1)", "(2,1),(0.5,1)", 1.0),
    ("mixed", "(1,2),(2,2)", "(2,1),(1,2)", 0.0), ("mixed", "\\log_2 8", "3", 1.0),
    ("mixed", "\\log_{2}{9}", "2\\log_2 3", 1.0), ("mixed", "\\log_3 8", "3", 0.0),
    ("mixed", "\\frac{\\pi}{4}", "\\frac{\\pi}{4}", 1.0), ("mixed", "45^\\circ", "45", 1.0),
    ("mixed", "\\frac{\\pi}{4}", "\\frac{\\pi}{3}", 0.0), ("mixed", "\\sqrt{50}", "5\\sqrt2", 1.0),
    ("mixed", "5\\sqrt{3}", "5\\sqrt2", 0.0), ("mixed", "\\frac{\\sqrt{5}+1}{2}", "\\frac{1+\\sqrt{5}}{2}", 1.0),
    ("mixed", "\\frac{\\sqrt{5}-1}{2}", "\\frac{1+\\sqrt{5}}{2}", 0.0),
    ("mixed", "y = \\frac{1}{2}x + 3", "y=\\frac12 x+3", 1.0),
    ("mixed", "y = \\frac{1}{2}x - 3", "y=\\frac12 x+3", 0.0), ("mixed", "(x-1)(x+2)", "x^2+x-2", 1.0),
    ("mixed", "(x-1)(x-2)", "x^2+x-2", 0.0), ("mixed", "10\\%", "10", 1.0),
    ("mixed", "10\\%", "0.1", 1.0), ("mixed", "20\\%", "10", 0.0),
    ("mixed", "\\infty", "\\infty", 1.0), ("mixed", "-\\infty", "\\infty", 0.0),
    ("mixed", "\\dfrac{9}{2}", "4.5", 1.0), ("mixed", "\\dfrac{9}{4}", "4.5", 0.0),
    ("mixed", "x = 2", "2", 1.0), ("mixed", "x=-2", "2", 0.0),
    ("mixed", "a=2, b=3", "a=2,b=3", 1.0), ("mixed", "a=2, b=3", "(2,3)", 1.0),
    ("mixed", "a=3, b=2", "(2,3)", 0.0),
    ("mixed", "(-\\infty, -2) \\cup (3, \\infty)", "(-\\infty,-2)\\cup(3,\\infty)", 1.0),
    ("mixed", "(-\\infty, -2] \\cup (3, \\infty)", "(-\\infty,-2)\\cup(3,\\infty)", 0.0),
    ("mixed", "x<-2 \\text{ or } x>3", "(-\\infty,-2)\\cup(3,\\infty)", 1.0),
    ("mixed", "\\text{odd}", "\\text{Odd}", 1.0), ("mixed", "\\text{even}", "\\text{odd}", 0.0),
    ("mixed", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", 1.0),
    ("mixed", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", 0.0),
    ("mixed", "\\begin{pmatrix} 4/2 \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", 1.0),
    ("mixed", "\\left[ -2, 7 \\right]", "[-2,7]", 1.0), ("mixed", "[-2, 7)", "[-2,7]", 0.0),
    ("mixed", "3\\sqrt{2}\\text{ units}", "3\\sqrt2", 1.0), ("mixed", "5 \\text{ hours}", "5", 1.0),
    ("mixed", "\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}", 1.0),
    ("mixed", "\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt3}", 1.0), ("mixed", "2^{2017}", "2^{2017}", 1.0),
    ("mixed", "2^{2016}", "2^{2017}", 0.0), ("mixed", "4^{1008}\\cdot 2", "2^{2017}", 1.0),
    ("mixed", "\\frac{7}{3}", "2\\frac{1}{3}", 1.0), ("mixed", "\\frac{8}{3}", "2\\frac13", 0.0),
    ("mixed", "1\\frac{1}{4}", "\\frac54", 1.0), ("mixed", "k = 4", "4", 1.0),
    ("mixed", "n=10", "10", 1.0), ("mixed", "r = 3", "3", 1.0),
    ("mixed", "m=\\frac{1}{2}", "\\frac12", 1.0), ("mixed", "\\angle ABC = 30^\\circ", "30", 1.0),
    ("mixed", "0.\\overline{3}", "\\frac13", 1.0), ("mixed", "\\frac{1}{3}", "0.\\overline{3}", 1.0),
    ("mixed", "3.14", "\\pi", 0.0), ("mixed", "\\pi", "3.14", 1.0),
    ("mixed", "1.5 \\times 10^{3}", "1500", 1.0), ("mixed", "1.5 \\times 10^{4}", "1500", 0.0),
    ("mixed", "1500", "1.5 \\times 10^3", 1.0), ("mixed", "e^{2}", "e^2", 1.0),
    ("mixed", "\\exp(2)", "e^2", 1.0), ("mixed", "e^3", "e^2", 0.0),
    ("mixed", "\\sqrt{x^2}", "|x|", 1.0), ("mixed", "\\sqrt{x^2}", "x", 0.0),
    ("mixed", "\\frac{x+1}{x-1}", "\\frac{x-1}{x+1}", 0.0), ("mixed", "\\frac{2x+2}{2}", "x+1", 1.0),
    ("mixed", "\\binom{5}{2}", "10", 1.0), ("mixed", "\\binom{5}{3}", "11", 0.0),
    ("mixed", "5!", "120", 1.0), ("mixed", "5!", "24", 0.0),
    ("mixed", "12\\text{ cm}^2", "12 \\text{cm}^2", 1.0), ("mixed", "144", "12^2", 1.0),
    ("mixed", "\\text{None}", "\\text{none}", 1.0),
    ("mixed", "\\text{no real solutions}", "\\text{No real solutions}", 1.0),
    ("mixed", "\\frac{3}{4}\\text{ of the cake}", "\\frac34", 1.0),
    ("mixed", "-\\frac{1}{3}", "-\\dfrac{1}{3}", 1.0), ("mixed", "\\frac{1}{3}", "-\\dfrac{1}{3}", 0.0),
    ("mixed", "-\\frac13", "-0.\\overline{3}", 1.0), ("mixed", "2 \\text{ and } 3", "2,3", 1.0),
    ("mixed", "2 and 3", "2,3", 1.0), ("mixed", "2 or 3", "3, 2", 1.0),
    ("mixed", "\\{-1, 1\\}", "\\pm 1", 1.0), ("mixed", "\\{1\\}", "\\pm 1", 0.0),
    ("mixed", "(0, 1)", "(0,1)", 1.0), ("mixed", "(1, 0)", "(0,1)", 0.0),
    ("mixed", "(0, 1]", "(0,1)", 0.0), ("mixed", "\\$1,000", "1000", 1.0),
    ("mixed", "1,000,000", "10^6", 1.0), ("mixed", "1,000,001", "10^6", 0.0),
    ("mixed", "\\frac{a+b}{2}", "\\frac{b+a}{2}", 1.0), ("mixed", "\\frac{a-b}{2}", "\\frac{b-a}{2}", 0.0),
    ("mixed", "\\sin 30^\\circ", "\\frac12", 0.0), ("mixed", "x^2 + y^2 = 25", "x^2+y^2=25", 1.0),
    ("mixed", "(x-1)^2 + y^2 = 4", "x^2-2x+1+y^2=4", 1.0), ("mixed", "\\pi r^2", "\\pi r^{2}", 1.0),
    ("mixed", "2\\pi r", "\\pi r^{2}", 0.0), ("mixed", "\\text{B}", "B", 1.0),
    ("mixed", "(B) 3", "B", 1.0), ("mixed", "B.", "B", 1.0),
    ("mixed", "\\textbf{(B)}", "B", 1.0), ("mixed", "3 + 2\\sqrt{2}", "(1+\\sqrt2)^2", 1.0),
    ("mixed", "\\sqrt{2}+1", "\\frac{1}{\\sqrt2-1}", 1.0), ("mixed", "2\\sqrt{6}", "\\sqrt{24}", 1.0),
    ("mixed", "\\sqrt{6}", "\\sqrt{24}", 0.0), ("mixed", "-2", "-2", 1.0),
    ("mixed", "-(2)", "-2", 1.0), ("mixed", "--2", "2", 1.0),
    ("mixed", "\\frac{100}{3}", "33\\frac{1}{3}", 1.0), ("mixed", "33.3", "33\\frac{1}{3}", 0.0),
    ("mixed", "33.33", "\\frac{100}{3}", 0.0), ("mixed", "90^\\circ", "90", 1.0),
    ("mixed", "\\frac{\\pi}{2}", "90^\\circ", 0.0), ("mixed", "\\frac{5}{36}", "\\frac{5}{36}", 1.0),
    ("mixed", "\\frac{5}{35}", "\\frac{5}{36}", 0.0), ("mixed", "0.05", "5\\%", 1.0),
    ("mixed", "0.5", "5\\%", 0.0), ("mixed", "\\frac{1}{2}, \\frac{1}{3}", "\\frac13,\\frac12", 1.0),
    ("mixed", "\\left\\{ \\frac{1}{2}, 3 \\right\\}", "\\{0.5, 3\\}", 1.0),
    ("mixed", "x = 1 \\text{ or } x = -3", "1, -3", 1.0), ("mixed", "x=1,x=-3", "-3,1", 1.0),
    ("mixed", "x = 1", "1, -3", 0.0), ("mixed", "1", "1,-3", 0.0),
    ("mixed", "\\text{all real numbers}", "(-\\infty,\\infty)", 0.0), ("mixed", "5\\text{ m}", "5", 1.0),
    ("mixed", "5 m", "5", 1.0), ("mixed", "\\frac{4}{3}\\pi", "\\frac{4\\pi}{3}", 1.0),
    ("mixed", "\\frac{3}{4}\\pi", "\\frac{4\\pi}{3}", 0.0), ("mixed", "1/6", "\\frac{1}{6}", 1.0),
    ("mixed", "\\frac{1}{6}\\approx 0.167", "\\frac16", 1.0),
    # near misses that must stay wrong
    ("near-miss", "-\\frac{3}{4}", "\\frac34", 0.0), ("near-miss", "-12", "12", 0.0),
    ("near-miss", "x-2", "x+2", 0.0), ("near-miss", "(2,-3)", "(2,3)", 0.0),
    ("near-miss", "11", "12", 0.0), ("near-miss", "2^{10}-1", "1024", 0.0),
    ("near-miss", "(1,3]", "[1,3]", 0.0), ("near-miss", "\\{1,2\\}", "(1,2)", 0.0),
    ("near-miss", "\\frac{1}{2}", "\\frac{1}{2}x", 0.0), ("near-miss", "x^2", "2x", 0.0),
    ("near-miss", "\\frac{\\sqrt{2}}{2}", "\\sqrt{2}", 0.0), ("near-miss", "2\\pi", "\\pi^2", 0.0),
    ("near-miss", "25\\%", "0.025", 0.0), ("near-miss", "1,0000", "10000", 0.0),
    ("near-miss", "12.5", "125", 0.0), ("near-miss", "0.125", "\\frac{1}{4}", 0.0),
    ("near-miss", "(3,4)", "(4,3)", 0.0), ("near-miss", "[2,5]", "[2,5)", 0.0),
    ("near-miss", "\\{2\\}", "\\{2,3\\}", 0.0), ("near-miss", "x=2, y=3", "(3,2)", 0.0),
    ("near-miss", "y=2x+3", "y=3x+2", 0.0), ("near-miss", "a+b", "ab", 0.0),
    ("near-miss", "C", "(D)", 0.0), ("near-miss", "\\text{(A)}", "B", 0.0),
    ("near-miss", "60^\\circ", "30^\\circ", 0.0), ("near-miss", "5\\text{ cm}", "50", 0.0),
    ("near-miss", "\\$5.50", "5.05", 0.0), ("near-miss", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", 0.0),
    ("near-miss", "\\frac{3}{4\\sqrt{2}}", "\\frac{3\\sqrt{2}}{4}", 0.0),
    ("near-miss", "2\\sqrt{2}+1", "2\\sqrt{2}", 0.0), ("near-miss", "x^2+2x+1.0001", "x^2+2x+1", 0.0),
    ("near-miss", "\\frac{n(n-1)}{2}", "\\frac{n(n+1)}{2}", 0.0),
    ("near-miss", "\\binom{10}{4}", "\\binom{10}{3}", 0.0), ("near-miss", "\\log 3", "\\log 2", 0.0),
    ("near-miss", "-i", "i", 0.0), ("near-miss", "1-i", "1+i", 0.0),
    ("near-miss", "0", "\\infty", 0.0), ("near-miss", "(0,\\infty)", "(-\\infty,\\infty)", 0.0),
    ("near-miss", "\\{0\\}", "\\emptyset", 0.0),
    ("near-miss", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 0.0),
    ("near-miss", "\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 0.0),
    ("near-miss", "0.3", "\\frac13", 0.0), ("near-miss", "1.73", "\\sqrt{3}", 0.0),
    ("near-miss", "3.1416", "\\pi", 0.0), ("near-miss", "\\pi", "3.15", 0.0),
    ("near-miss", "\\sqrt{4}+1", "2", 0.0), ("near-miss", "2\\frac{1}{5}", "\\frac{5}{2}", 0.0),
    ("near-miss", "(3, 2)", "2, 3", 0.0), ("near-miss", "x \\ge 3", "(3,\\infty)", 0.0),
    ("near-miss", "\\frac{1}{2}\\pi", "\\frac{1}{2}", 0.0), ("near-miss", "30\\pi", "30", 0.0),
    ("near-miss", "\\pi", "180", 0.0), ("near-miss", "10!", "10", 0.0),
    ("near-miss", "5i", "5", 0.0), ("near-miss", "2i", "2", 0.0),
    ("near-miss", "\\text{(C) } 15", "B", 0.0), ("near-miss", "-\\sqrt{2}", "\\sqrt{2}", 0.0),
    ("near-miss", "\\sqrt{2}-1", "1-\\sqrt{2}", 0.0), ("near-miss", "2x^2", "(2x)^2", 0.0),
    ("near-miss", "\\frac{x}{2}", "\\frac{2}{x}", 0.0), ("near-miss", "x^{-1}", "-x", 0.0),
    ("near-miss", "e^{x}", "e^{-x}", 0.0), ("near-miss", "\\ln x", "\\ln 2x", 0.0),
    ("near-miss", "\\sin x", "\\cos x", 0.0), ("near-miss", "(x+1)^3", "x^3+1", 0.0),
    ("near-miss", "x^2-4", "(x-2)^2", 0.0), ("near-miss", "4", "4x", 0.0),
    ("near-miss", "y", "x", 0.0), ("near-miss", "2\\pi r", "2\\pi R", 0.0),
    ("near-miss", "x_1", "x_2", 0.0), ("near-miss", "\\frac{1}{6}", "\\frac{1}{5}", 0.0),
    ("near-miss", "0.16", "\\frac16", 0.0), ("near-miss", "0.1666", "\\frac16", 0.0),
    ("near-miss", "16.7\\%", "\\frac16", 0.0), ("near-miss", "100", "99", 0.0),
    ("near-miss", "1000", "1001", 0.0), ("near-miss", "999", "1000", 0.0),
    ("near-miss", "-1", "1", 0.0), ("near-miss", "0", "1", 0.0),
    ("near-miss", "\\frac{0}{1}", "1", 0.0), ("near-miss", "1", "\\frac{1}{0}", 0.0),
    ("near-miss", "7", "\\text{(7)}x", 0.0), ("near-miss", "2\\sqrt{5}", "5\\sqrt{2}", 0.0),
    ("near-miss", "\\sqrt{10}", "10", 0.0), ("near-miss", "3^4", "4^3", 0.0),
    ("near-miss", "2^{-1}", "-2", 0.0), ("near-miss", "(1,2)\\cup(3,4)", "(1,4)", 0.0),
    ("near-miss", "[1,2]\\cup[3,4]", "[1,2]\\cup[3,5]", 0.0), ("near-miss", "(-1,1)", "[-1,1]", 0.0),
    ("near-miss", "\\{1,2,3\\}", "\\{1,2\\}", 0.0), ("near-miss", "1,2,3", "1,2", 0.0),
    ("near-miss", "(1,2,3)", "(1,3,2)", 0.0), ("near-miss", "\\pm 3", "\\pm 2", 0.0),
    ("near-miss", "3", "\\pm 3", 0.0), ("near-miss", "x=\\pm 2", "2", 0.0),
    ("near-miss", "\\text{A}", "\\text{B}", 0.0), ("near-miss", "\\text{(E)}", "E, A", 0.0),
    ("near-miss", "A", "(B)", 0.0), ("near-miss", "45", "45\\sqrt{2}", 0.0),
    ("near-miss", "180^\\circ", "360^\\circ", 0.0), ("near-miss", "12\\text{ inches}", "1\\text{ foot}", 0.0),
    ("near-miss", "3 \\text{ hours}", "180", 0.0), ("near-miss", "\\$20", "\\$2.00", 0.0),
    ("near-miss", "50\\%", "5", 0.0), ("near-miss", "1.5", "\\frac{2}{3}", 0.0),
    ("near-miss", "\\frac{3}{2}", "\\frac23", 0.0), ("near-miss", "0.6", "0.66", 0.0),
    ("near-miss", "\\frac{2}{3}", "6.7\\%", 0.0), ("near-miss", "\\dfrac{\\pi}{2}", "\\dfrac{\\pi}{4}", 0.0),
    ("near-miss", "\\frac{\\pi}{2}", "\\frac{\\pi^2}{2}", 0.0), ("near-miss", "\\sqrt{\\pi}", "\\pi", 0.0),
    ("near-miss", "x^2+y^2=1", "x^2+y^2=2", 0.0), ("near-miss", "x+y=1", "x-y=1", 0.0),
    ("near-miss", "y=x", "y=-x", 0.0), ("near-miss", "f(x)=2x", "3x", 0.0),
    # malformed input is wrong, never an error
    ("malformed", "\\frac{1}{", "\\frac{1}{2}", 0.0),
    ("malformed", "}}}{{{", "5", 0.0),
    ("malformed", "\\unknowncommand{5}", "5", 0.0),
    ("malformed", "__import__('os')", "5", 0.0),
    ("malformed", "(1, 2", "(1,2)", 0.0),
    ("malformed", "5", "", 0.0),
    ("malformed", "", "", 0.0),
    ("malformed", "|x", "x", 0.0),
    ("malformed", "\\sqrt{}", "0", 0.0),
]


@pytest.mark.parametrize("tag,completion,answer,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_reward_table(tag, completion, answer, expected):
    if "boxed" not in completion and "fbox" not in completion and tag != "extract":
        completion = box(completion)
    assert reward(completion, answer) == expected


def test_table_is_large_and_balanced():
    assert len(CASES) >= 150
    assert 0.4 < sum(c[3] for c in CASES) / len(CASES) < 0.6


def test_agrees_with_sympy_on_its_own_latex():
    # sympy's LaTeX printer writes one expression in several forms; all must be equal, and a shifted one not
    sp = pytest.importorskip("sympy")
    x, y = sp.symbols("x y")
    exprs = [(x + 1) ** 3, (x - y) * (x + y) / 3, sp.sqrt(2) * (x - sp.pi), 1 / (x ** 2 - 1),
             sp.Rational(7, 3) * x * y, (sp.sqrt(3) + 1) ** 2 / 4, x ** 2 / (x + sp.sqrt(5)),
             sp.pi * (x + 2) ** 2 - 4 * sp.pi, (2 * x - 3) ** 2 * y]
    for e in exprs:
        forms = [sp.latex(f(e)) for f in (lambda v: v, sp.expand, sp.factor, sp.together, sp.cancel)]
        for f in forms[1:]:
            assert is_equiv(f, forms[0]), (f, forms[0])
        assert not is_equiv(sp.latex(e + sp.Rational(1, 7)), forms[0])
        assert not is_equiv(sp.latex(e * 2), forms[0])


def test_extract_boxed():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{{a}{b{c}}}") == "{a}{b{c}}"
    assert extract_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_boxed("so \\boxed 5.") == "5."
    assert extract_boxed("$\\boxed 5$") == "5"
    assert extract_boxed("\\fbox{3}") == "3"
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{}") is None
    assert extract_boxed("\\boxed{ }") is None
    assert extract_boxed("\\boxed{1") is None
    assert extract_boxed(None) is None


def test_is_equiv_helper():
    assert is_equiv("\\frac{1}{2}", "0.5")
    assert not is_equiv("x+1", "x-1")
    assert not is_equiv(None, "1")


@pytest.mark.parametrize("bad", [None, 5, b"\\boxed{5}", ["\\boxed{5}"], 3.0])
def test_non_string_input_scores_zero(bad):
    assert reward(bad, "5") == 0.0
    assert reward("\\boxed{5}", bad) == 0.0


def _timed_in_thread(completion, answer):
    out = {}

    def run():
        t = time.perf_counter()
        out["r"] = reward(completion, answer)
        out["t"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    th.start()
    th.join(10)
    return out["r"], out["t"]


@pytest.mark.parametrize("pred,gold", [
    ("9^{9^{9^{9}}}", "1"),
    ("9^{9^{9^{9}}}", "9^{9^{9^{8}}}"),
    ("100000!", "5"),
    ("(10^{10})!", "2"),
    ("2^{2^{2^{2^{2^{2}}}}} - x", "x"),
    ("\\binom{10^{9}}{10^{8}}", "5"),
    ("x^{10^{12}}", "x"),
])
def test_explosive_inputs_from_a_thread_return_fast(pred, gold):
    assert reward(box("\\sqrt{4}"), "2") == 1.0  # the first sympy call may wait for the worker to start
    r, t = _timed_in_thread(box(pred), gold)
    assert r == 0.0 and t < 1.5


def test_explosive_input_equal_to_itself():
    assert reward(box("\\sqrt{4}"), "2") == 1.0
    r, t = _timed_in_thread(box("9^{9^{9^{9}}}"), "9^{9^{9^9}}")
    assert r == 1.0 and t < 1.5


def test_slow_sympy_is_cut_off_and_the_worker_recovers():
    # passes every pre-check, but sympy's simplify() needs ~40 s for it: the worker must be killed
    pred, gold = "\\infty x + (x+1)^{300}(x+3)^{300}", "\\infty x + (x+2)^{600}"
    assert reward(box("\\sqrt{4}"), "2") == 1.0
    r, t = _timed_in_thread(box(pred), gold)
    assert r == 0.0 and 0.5 < t < 1.5
    assert reward(box("\\sqrt{8}"), "2\\sqrt{2}") == 1.0  # a fresh worker takes over


def test_long_inputs():
    t = time.perf_counter()
    assert reward("x" * 100_000 + "\\boxed{5}", "5") == 1.0
    assert reward("\\boxed{" + "1" * 100_000 + "}", "1") == 0.0
    assert reward("\\boxed{" + "{" * 100_000, "1") == 0.0
    assert reward("\\boxed{" + "\\frac{" * 20_000 + "}" * 40_000 + "}", "1") == 0.0
    assert reward("\\boxed{5}" * 20_000, "5") == 1.0
    assert reward("\\boxed{5}", "x+" * 50_000 + "1") == 0.0
    assert time.perf_counter() - t < 3.0


def test_many_threads_at_once():
    results = [None] * 8

    def run(k):
        results[k] = (reward(box("(x+1)^2"), "x^2+2x+1"), reward(box("\\sqrt{8}"), "3"))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert results == [(1.0, 0.0)] * 8
    assert time.perf_counter() - t < 10


def test_worker_is_cleaned_up_at_exit_and_fork_safe():
    script = ("import multiprocessing as mp, reward\n"
              "assert reward.reward('\\\\boxed{\\\\sqrt{8}}', '2\\\\sqrt{2}') == 1.0\n"
              "print(*[w.proc.pid for w in reward._live])\n"
              "ctx = mp.get_context('fork'); q = ctx.Queue()\n"  # a forked child gets workers of its own
              "p = ctx.Process(target=lambda: q.put(reward.reward('\\\\boxed{(x+1)^2}', 'x^2+2x+1'))); p.start()\n"
              "assert q.get(timeout=60) == 1.0; p.join()\n")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script], cwd=here, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    time.sleep(0.2)
    for pid in map(int, out.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the worker went with its parent
