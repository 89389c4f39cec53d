"""Helpers shared by the test files."""


def update_gap(a, b, base):
    """||a - b|| / ||a - base|| over the tensors of two state dicts and their common start: how far apart two runs
    ended, against how far they moved. (A max-abs bound is flaky: Adam turns a rounding-level difference of a
    near-zero gradient into a step of lr.)"""
    def norm(diff):
        return sum((diff(k) ** 2).sum() for k in a) ** 0.5
    return (norm(lambda k: a[k].double() - b[k].double()) / norm(lambda k: a[k].double() - base[k].double())).item()
