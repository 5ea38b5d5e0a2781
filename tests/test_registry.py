"""dcgmm_fast.backends: every backend name lives in one registry, and the names everywhere else agree with it."""
import typing

import pytest
import torch

from dcgmm_fast import backends, ops, types
from dcgmm_fast.cli import build_parser


def test_every_backend_name_comes_from_the_registry():
    names = backends.names()
    assert names == ("reference", "cpp", "triton", "cuda")
    assert typing.get_args(types.Backend) == ("auto",) + names  # the Literal users see
    assert ops.BACKENDS == names
    for order in backends.AUTO_ORDER.values():
        assert set(order) <= set(names)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = next(a.choices for a in train._actions if a.dest == "backend")
    assert tuple(choices) == ("auto",) + names


def test_every_registered_backend_has_a_module_with_the_interface():
    for name in backends.names():
        module = backends.module(name)
        for fn in ("problem", "cgmm", "patch_average", "sample_components"):
            assert callable(getattr(module, fn)), f"{name}.{fn}"


def test_cuda_backend_without_a_gpu_says_what_to_use():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(backends.BackendNotAvailable, match="use backend='(triton|cpp)"):
        backends.resolve("cuda", torch.device("cpu"))


def test_fused_backends_never_call_the_oracle():
    """No fused backend module imports dcgmm_fast.reference (its forward and backward must not run the oracle
    that the tests compare them with)."""
    import ast
    import inspect

    from dcgmm_fast.backends import cpp, cuda, fused, triton

    for module in (cpp, cuda, fused, triton):
        tree = ast.parse(inspect.getsource(module))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not any("reference" in name for name in imported), (module.__name__, imported)
