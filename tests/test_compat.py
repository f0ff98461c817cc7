"""What must hold on every supported torch (README's requirements): an optional backend that fails to import
leaves the others working and says why, and the Triton ops take the C++ op's arguments."""

import subprocess
import sys
import textwrap

import pytest
import torch

import pointins_ops  # noqa: F401  (registers the ops)

pytest.importorskip("triton")


def test_a_triton_backend_that_fails_to_import_leaves_the_others_working_and_says_why():
    # Any exception, not only ImportError: Triton 3.2 raises RuntimeError ("0 active drivers") without a GPU.
    script = textwrap.dedent("""
        import sys
        import torch

        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "pointins_ops.triton.op":
                    raise RuntimeError("planted failure")
                return None

        sys.meta_path.insert(0, Broken())
        import pointins_ops
        from pointins_ops import available_backends, instance_aware_conv

        assert "triton" not in available_backends("cpu") and "triton" not in available_backends("cuda")
        templates, weight = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3, 3)
        expected = instance_aware_conv(templates, weight, backend="torch")
        for backend in [b for b in available_backends("cpu") if b != "torch"] + ["auto"]:
            torch.testing.assert_close(instance_aware_conv(templates, weight, backend=backend), expected)
        try:
            instance_aware_conv(templates, weight, backend="triton")
        except RuntimeError as error:
            print(error)
        else:
            raise SystemExit("backend='triton' did not raise")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ("backend='triton' cannot run tensors on cpu: the Triton backend failed to import "
            "(RuntimeError: planted failure)") in result.stdout


def _signature(op):
    schema = op.default._schema
    return [(argument.name, str(argument.type)) for argument in schema.arguments], len(schema.returns)


def test_triton_ops_take_the_arguments_of_the_cpp_ops():
    # The Triton ops' schemas are inferred from the launchers' annotations (pointins_ops._compat.register_op):
    # the annotations must say what the C++ schemas say (SymInt shows as int here, as in the C++ ops).
    if "cpu" not in pointins_ops.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    assert pointins_ops.triton.AVAILABLE, f"the Triton backend failed to import: {pointins_ops.triton.IMPORT_ERROR}"
    for name, triton_name in [("instance_aware_conv", "instance_aware_conv_triton"),
                              ("instance_aware_conv_backward", "instance_aware_conv_triton_backward")]:
        assert _signature(getattr(torch.ops.pointins_ops, triton_name)) == _signature(
            getattr(torch.ops.pointins_ops, name))
