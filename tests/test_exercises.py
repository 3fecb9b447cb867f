"""The exercise checkers say what is wrong, not only that something is."""
import torch

from course_lib.exercises import Verdict, check, check_function

EXPECTED = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def test_correct():
    v = check(EXPECTED.clone(), EXPECTED)
    assert v.ok and str(v).startswith("Correct!")
    assert check(EXPECTED.tolist(), EXPECTED).ok  # a list is turned into a tensor
    assert "1a7f37" in v._repr_html_()


def test_none_result():
    v = check(None, EXPECTED)
    assert not v.ok and "None" in v.message and "return" in v.message
    assert str(v).startswith("Not yet:") and "b42318" in v._repr_html_()


def test_not_a_tensor():
    v = check(object(), EXPECTED)
    assert not v.ok and "should be a tensor" in v.message and "object" in v.message


def test_shape_errors():
    transposed = check(EXPECTED.T, EXPECTED)
    assert not transposed.ok and "(3, 2)" in transposed.message and "(2, 3)" in transposed.message
    assert "reshape or transpose" in transposed.message
    extra_dim = check(EXPECTED[:, :, None].expand(2, 3, 2), EXPECTED)
    assert "missing or extra dimension" in extra_dim.message
    wrong = check(torch.zeros(2, 4), EXPECTED)
    assert not wrong.ok and "(2, 4)" in wrong.message


def test_integer_dtype():
    v = check(EXPECTED.long(), EXPECTED)
    assert not v.ok and "dtype" in v.message and "floating-point" in v.message


def test_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        x = EXPECTED.clone()
        x[0, 1] = bad
        v = check(x, EXPECTED)
        assert not v.ok and "NaN or inf" in v.message


def test_constant_factor():
    v = check(2 * EXPECTED, EXPECTED)
    assert not v.ok and "constant factor of 2" in v.message
    v = check(-0.5 * EXPECTED, EXPECTED)
    assert "constant factor of -0.5" in v.message


def test_all_zero_answer_is_not_called_a_constant_factor():
    v = check(torch.zeros(2, 3), EXPECTED)
    assert not v.ok and "factor" not in v.message and "every value is 0" in v.message
    assert check(torch.zeros(2, 3), torch.zeros(2, 3)).ok  # unless 0 is the answer
    # a listed mistake that produces zeros is still named
    assert "forgot" in check(torch.zeros(2, 3), EXPECTED, mistakes={"you forgot x_0": torch.zeros(2, 3)}).message


def test_listed_mistake_is_named_first():
    mistakes = {"you used sqrt(alpha_bar) where alpha_bar belongs": EXPECTED + 1,
                "you doubled it": 2 * EXPECTED}
    v = check(EXPECTED + 1, EXPECTED, mistakes=mistakes)
    assert not v.ok and v.message == "it looks like you used sqrt(alpha_bar) where alpha_bar belongs."
    assert "you doubled it" in check(2 * EXPECTED, EXPECTED, mistakes=mistakes).message


def test_other_differences_report_the_largest():
    x = EXPECTED.clone()
    x[1, 2] += 0.5
    v = check(x, EXPECTED)
    assert not v.ok and "0.5" in v.message and "by hand" in v.message


def test_tolerances():
    assert check(EXPECTED + 1e-6, EXPECTED).ok
    assert not check(EXPECTED + 1e-6, EXPECTED, rtol=0, atol=1e-9).ok


def test_check_function():
    ref = lambda x, k: x * k  # noqa: E731
    inputs = [(EXPECTED, 2.0), (torch.ones(3), 0.5)]
    v = check_function(lambda x, k: k * x, ref, inputs)
    assert v.ok and "2 test input(s)" in v.message
    v = check_function(lambda x, k: x + k, ref, inputs, mistakes={"you added instead of multiplying": lambda x, k: x + k})
    assert not v.ok and "added instead of multiplying" in v.message


def test_check_function_reports_exceptions():
    def broken(x, k):
        raise IndexError("index 3 is out of bounds")

    v = check_function(broken, lambda x, k: x, [(EXPECTED, 1.0)])
    assert isinstance(v, Verdict) and not v.ok
    assert "IndexError" in v.message and "index 3 is out of bounds" in v.message


def test_check_function_stops_at_the_first_wrong_input():
    calls = []

    def fn(x):
        calls.append(x)
        return x if len(calls) == 1 else x * 3

    v = check_function(fn, lambda x: x, [(EXPECTED,), (EXPECTED,), (EXPECTED,)])
    assert not v.ok and "constant factor of 3" in v.message and len(calls) == 2
