"""Reading TensorBoard event files back, as `tensorboard --logdir` would: what the `--log-dir`
tests share (tests/test_tracking.py, and the runs of tests/test_ray.py and tests/test_sweep.py)."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

__all__ = ["events", "hparams_data", "hparams_metadata", "scalars", "session_hparams"]


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})  # 0: keep every event, not a sample
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def hparams_data(acc: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[tag])


def session_hparams(acc: EventAccumulator) -> dict:
    values = hparams_data(acc, hparams_metadata.SESSION_START_INFO_TAG).session_start_info.hparams
    return {k: v.string_value if v.HasField("string_value") else v.bool_value if v.HasField("bool_value")
            else v.number_value for k, v in values.items()}
