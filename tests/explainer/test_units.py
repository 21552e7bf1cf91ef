"""The explainer's pure parts: config defaults and ranges, the model's view
of a signature, image layouts, grid superpixels and shared evaluations."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.explainer.methods import grid_segments, ranked
from conveyor.services.explainer.model_spec import explained_model
from conveyor.services.explainer.requests import images, resolve_config
from conveyor.services.explainer.sharing import EvaluationCancelled, SharedEvaluations
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError


def tensor(name: str, shape: list[int], **fields: object) -> registry_pb.TensorSpec:
    return registry_pb.TensorSpec(
        name=name,
        dtype=registry_pb.TENSOR_DATA_TYPE_FP32,
        shape=shape,
        **fields,  # type: ignore[arg-type]
    )


def version(
    inputs: list[registry_pb.TensorSpec], outputs: list[registry_pb.TensorSpec]
) -> registry_pb.ModelVersion:
    return registry_pb.ModelVersion(
        name="models/m/versions/2",
        signature=registry_pb.ModelSignature(inputs=inputs, outputs=outputs),
    )


def test_config_defaults_follow_each_method() -> None:
    lime = resolve_config(pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_LIME_TABULAR, seed=3))
    assert (lime.seed, lime.top_k, lime.num_samples(30)) == (3, 10, 5000)
    shap = resolve_config(pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_KERNEL_SHAP))
    assert shap.num_samples(30) == 2 * 30 + 2048
    assert shap.evaluations_per_instance(30, 50) == (2 * 30 + 2048) * 50
    assert shap.background_size == 50
    image = resolve_config(pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_LIME_IMAGE))
    assert image.num_samples(64) == 1000
    assert (image.segmentation, image.num_segments) == (pb.SEGMENTATION_ALGORITHM_QUICKSHIFT, 16)
    assert 0 <= image.seed < 2**32
    used = image.to_config()
    assert used.seed == image.seed
    assert used.image_options.num_segments == 16


def test_config_violations_are_all_named() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        resolve_config(
            pb.ExplanationConfig(
                method=pb.EXPLANATION_METHOD_LIME_IMAGE,
                num_samples=9,
                top_k=-2,
                target_index=-1,
                background_size=1001,
                image_options=pb.ImageOptions(num_segments=1, hide_value=float("nan")),
            )
        )
    assert [v.field for v in caught.value.violations] == [
        "config.num_samples",
        "config.top_k",
        "config.target_index",
        "config.background_size",
        "config.image_options.num_segments",
        "config.image_options.hide_value",
    ]


def test_a_signature_gives_the_explained_input_and_output() -> None:
    model = explained_model(
        version(
            [tensor("pixels", [-1, 1, 8, 8])],
            [tensor("probabilities", [-1, 10], class_names=[str(i) for i in range(10)])],
        ),
        "",
    )
    assert (model.model_id, model.version, model.input_datatype) == ("m", 2, "FP32")
    assert model.instance_shape == (1, 8, 8)
    assert model.num_features == 64
    assert model.output_width == 10
    assert model.class_name(3) == "3"
    assert model.feature_name(5) == "feature 5"
    layout = model.image_layout()
    assert layout is not None
    assert (layout.height, layout.width, layout.channels, layout.channels_first) == (8, 8, 1, True)
    assert model.reference_sample is None


def test_signatures_that_cannot_be_explained_say_why() -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        explained_model(
            version(
                [tensor("a", [-1, 3]), tensor("b", [-1, 3])],
                [tensor("p", [-1, 2]), tensor("q", [-1, 2])],
            ),
            "",
        )
    assert [v.description for v in caught.value.violations] == [
        "has 2 inputs in its signature; the explainer needs exactly one",
        "has 2 outputs in its signature; name the one to explain in config.output_name",
    ]
    with pytest.raises(FailedPreconditionError, match="needs a batch dimension"):
        explained_model(version([tensor("a", [3, 4])], [tensor("p", [-1, 2])]), "")
    with pytest.raises(InvalidArgumentError) as unknown:
        explained_model(version([tensor("a", [-1, 3])], [tensor("p", [-1, 2])]), "logits")
    assert unknown.value.violations[0].field == "config.output_name"
    picked = explained_model(
        version([tensor("a", [-1, 3])], [tensor("p", [-1, 2]), tensor("logits", [-1, 2])]),
        "logits",
    )
    assert picked.output_name == "logits"


def test_images_are_read_in_any_layout_as_height_width_channels() -> None:
    model = explained_model(version([tensor("x", [-1, 3, 2, 4])], [tensor("p", [-1, 2])]), "")
    chw = np.arange(24, dtype=np.float64).reshape(3, 2, 4)
    hwc = chw.transpose(1, 2, 0)
    for image in (
        pb.Image(shape=[3, 2, 4], layout=pb.IMAGE_LAYOUT_CHW, pixels=chw.reshape(-1).tolist()),
        pb.Image(shape=[2, 4, 3], layout=pb.IMAGE_LAYOUT_HWC, pixels=hwc.reshape(-1).tolist()),
    ):
        [read] = images([image], model, field="instance", item=".image")
        assert np.array_equal(read, hwc)
    with pytest.raises(InvalidArgumentError) as caught:
        images(
            [
                pb.Image(shape=[3, 2, 4], pixels=[0.0] * 24),
                pb.Image(shape=[2, 4], pixels=[0.0] * 7),
                pb.Image(shape=[4, 2, 3], layout=pb.IMAGE_LAYOUT_HWC, pixels=[0.0] * 24),
            ],
            model,
            field="instances",
            item=".image",
        )
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("instances[0].image.layout", "required for a three-dimensional image: HWC or CHW"),
        ("instances[1].image.pixels", "7 pixels; the shape [2, 4] holds 8"),
        (
            "instances[2].image.shape",
            "the image is 4x2x3 (height x width x channels); models/m/versions/2 takes 2x4x3",
        ),
    ]


def test_grid_superpixels_tile_the_image() -> None:
    grid = grid_segments(8, 8, 16)
    assert grid.shape == (8, 8)
    assert sorted(np.unique(grid).tolist()) == list(range(16))
    assert (np.bincount(grid.reshape(-1)) == 4).all()
    assert grid[0, 0] == 0
    assert grid[7, 7] == 15
    wide = grid_segments(4, 16, 8)
    assert len(np.unique(wide)) == 8


def test_contributions_rank_by_absolute_weight_then_position() -> None:
    assert ranked([(0, 0.1), (1, -0.5), (2, 0.5), (3, 0.0)]) == [
        (1, -0.5),
        (2, 0.5),
        (0, 0.1),
        (3, 0.0),
    ]


def test_concurrent_requests_share_one_evaluation_and_get_their_own_rows() -> None:
    calls: list[int] = []

    def evaluate(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return rows * 10

    shared = SharedEvaluations(evaluate, participants=3)
    results: dict[int, np.ndarray] = {}

    def participant(index: int) -> None:
        try:
            results[index] = shared.evaluate(np.full((index + 1, 2), float(index)))
        finally:
            shared.leave()

    threads = [threading.Thread(target=participant, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert calls == [1 + 2 + 3]
    for index in range(3):
        assert np.array_equal(results[index], np.full((index + 1, 2), 10.0 * index))


def test_a_finished_participant_releases_the_others_and_failures_reach_everyone() -> None:
    calls: list[int] = []

    def evaluate(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("inference is down")
        return rows

    shared = SharedEvaluations(evaluate, participants=2)
    # One participant leaves without asking: the other is evaluated alone.
    shared.leave()
    assert shared.evaluate(np.ones((4, 1))).shape == (4, 1)
    with pytest.raises(RuntimeError, match="inference is down"):
        shared.evaluate(np.ones((2, 1)))
    shared.stop(TimeoutError("deadline"))
    with pytest.raises(EvaluationCancelled):
        shared.evaluate(np.ones((1, 1)))
    assert calls == [4, 2]
