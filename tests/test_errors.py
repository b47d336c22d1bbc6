"""The runtime's error classes (runtime/errors.py): one base, one class per kind of cause, each
still the ValueError it was before, and the CLI's one-line report of them."""

from __future__ import annotations

import pytest

import runtime
from runtime import BackendError, ChatTemplateError, ContextTooLong, LamaError, ManifestError, Runtime


def test_one_base_and_still_value_errors():
    for cls in (ManifestError, BackendError, ChatTemplateError, ContextTooLong):
        assert issubclass(cls, LamaError) and issubclass(cls, ValueError), cls
        assert cls.__name__ in runtime.__all__
    assert "LamaError" in runtime.__all__
    assert not issubclass(BackendError, ManifestError) and not issubclass(ManifestError, BackendError)


def test_the_manifest_module_raises_the_same_class():
    from runtime import manifest

    assert manifest.ManifestError is ManifestError


def test_an_export_problem_is_a_manifest_error_and_a_device_problem_a_backend_error(chat_export, tmp_path):
    import onnxruntime as ort

    with pytest.raises(ManifestError, match="export folder not found"):
        Runtime.load(tmp_path / "missing")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendError, match="not available"):
        Runtime.load(chat_export[0], providers=["CUDAExecutionProvider"])


def test_the_cli_prints_a_backend_error_on_one_line(chat_export, capsys):
    import onnxruntime as ort

    from runtime import cli

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    assert cli.main(["generate", str(chat_export[0]), "Hi", "--providers", "CUDAExecutionProvider"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lama generate: error: onnxruntime providers ['CUDAExecutionProvider'] are not available")
    assert err.count("\n") == 1 and "Traceback" not in err
