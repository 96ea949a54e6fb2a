"""Every Ray private API that maskdiet uses (pipeline/core/ray_compat.py) still exists in the installed Ray.

When a Ray upgrade moves or renames one, these fail with the entry's name, instead of maskdiet silently
losing the behaviour it depends on (IdleWait would stop pausing; Ray's notices would come back)."""

from __future__ import annotations

import importlib
import inspect
import logging

import ray
import ray.data

from pipeline.core import ray_compat
from pipeline.core.runtime import choose_data_profile, configure_data_context


def test_the_checked_version_is_the_installed_one() -> None:
    """A Ray upgrade means re-checking every entry in ray_compat.py, then moving this pin."""
    assert ray.__version__ == ray_compat.RAY_VERSION_CHECKED, (
        f"Ray {ray.__version__} is installed, ray_compat.py was checked on {ray_compat.RAY_VERSION_CHECKED}"
    )


def test_every_private_module_still_exists() -> None:
    for name in (
        ray_compat.AUTH_SETUP_LOGGER,
        ray_compat.DATA_PROGRESS_LOGGER,
        ray_compat.TRAIN_CONTEXT_MODULE,
    ):
        assert importlib.util.find_spec(name) is not None, f"{name} is gone from Ray {ray.__version__}"


def test_the_execution_callback_hook_is_the_one_we_override() -> None:
    assert hasattr(ray_compat.ExecutionCallback, "on_execution_step")
    assert "custom_execution_callback_classes" in ray.data.DataContext.__dataclass_fields__


def test_the_private_attributes_are_still_set_by_ray() -> None:
    """`StreamingExecutor._topology` and `PhysicalOperator._in_task_output_backpressure`: read from Ray's own
    source, since both are set only while a dataset executes."""
    from ray.data._internal.execution.interfaces import physical_operator
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    assert "self._topology" in inspect.getsource(StreamingExecutor)
    assert "_in_task_output_backpressure" in inspect.getsource(physical_operator)


def test_train_report_lines_are_quieted_by_the_context_module_logger() -> None:
    module = importlib.import_module(ray_compat.TRAIN_CONTEXT_MODULE)
    ray_compat.quiet_train_report_lines("ERROR")
    assert logging.getLogger(module.__file__).level == logging.ERROR
    assert "logging.getLogger(__file__)" in inspect.getsource(module).replace(" ", ""), (
        "Ray Train's context no longer logs under its file path: quiet_train_report_lines needs a new name"
    )


def test_data_profile_follows_the_cluster_size() -> None:
    from pipeline.core.config import RayConfig

    assert choose_data_profile(RayConfig(data_profile="small")).op_resource_reservation is False
    assert choose_data_profile(RayConfig(data_profile="large")).op_resource_reservation is True


def test_the_session_ray_gets_the_small_profile(ray_cluster: None) -> None:
    """The test Ray has 2 CPUs and no GPU: the laptop settings; a cluster above the threshold keeps Ray's."""
    from pipeline.core.config import RayConfig

    assert configure_data_context().name == "small"
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is False
    assert choose_data_profile(RayConfig(small_cluster_cpus=1)).name == "large"


def test_without_a_state_api_the_trainer_leaves_out_the_placement_group_cleaner() -> None:
    """With the dashboard off, Ray Train's cleaner would poll a State API that is not there and log a warning
    every second; our trainer drops it by its class name, which must still be Ray's."""
    from ray.train import ScalingConfig

    from pipeline.core.trainer import Trainer

    def names(state_api: bool) -> list[str]:
        trainer = Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1), state_api=state_api)
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    with_api, without_api = names(True), names(False)
    assert ray_compat.PG_CLEANER_CALLBACK in with_api
    assert without_api == [n for n in with_api if n != ray_compat.PG_CLEANER_CALLBACK]
