"""What a stage makes is what its registration declares: the runner's check after every stage (stages/registry.py)."""

import pytest

from workbench.stages import STAGES
from workbench.stages.build import BuildOptions
from workbench.stages.prune import PruneOptions
from workbench.stages.registry import UndeclaredArtifacts, check_made


def test_a_stage_that_makes_what_it_declares_passes_and_one_that_makes_more_is_refused_naming_it():
    prune, opts = STAGES["prune"], PruneOptions(method="magnitude", sparsity=0.5)
    check_made(prune, opts, set(), {"pruned", "pruned_file"})
    check_made(prune, opts, set(), {"pruned"})  # declared but not made: no error
    with pytest.raises(UndeclaredArtifacts, match=r"stage prune made quantized,") as e:
        check_made(prune, opts, set(), {"pruned", "pruned_file", "quantized"})
    assert "pruned_file" in str(e.value)  # what it does declare, to compare with


def test_only_new_artifacts_count_and_the_declaration_sees_what_was_made_before():
    # OpenVINO's FP32 IR is declared only where export made the FP32 graph before the build.
    build, opts = STAGES["build"], BuildOptions(engine="openvino")
    before = {"quantized", "onnx"}
    with pytest.raises(UndeclaredArtifacts, match="openvino_fp32"):
        check_made(build, opts, before, before | {"openvino_int8", "openvino_fp32"})
    before |= {"onnx_fp32"}
    check_made(build, opts, before, before | {"openvino_int8", "openvino_int8_graph", "openvino_fp32"})
