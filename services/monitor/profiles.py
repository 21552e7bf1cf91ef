"""What the monitor knows about each model version, loaded once and kept.

A :class:`~.ingest.VersionProfile` joins the version's registry record (its
signature and test metrics), its reference (uploaded, or built from the
training statistics on first use and stored), the fitted outlier scorer and
the model's monitoring config. Ingest needs one per call, so they are cached;
a config update or a new reference drops the affected ones.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Final

import numpy as np

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor import config as configs
from conveyor.services.monitor.ingest import SubjectHasher, VersionProfile
from conveyor.services.monitor.outliers import OutlierScorer, fit_scorer
from conveyor.services.monitor.references import (
    FeatureSchema,
    ReferenceData,
    from_training_statistics,
    summaries,
)
from conveyor.services.monitor.store import MonitorStore
from conveyor.shared import names
from conveyor.shared.errors import FailedPreconditionError, invalid_field
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

MAX_CACHED: Final = 1_024


def reference_name(model_version: str) -> str:
    return f"{model_version}/reference"


def model_of(model_version: str) -> str:
    return model_version.split("/versions/")[0]


class VersionProfiles:
    """Profiles by version name, loaded on first use."""

    def __init__(
        self,
        store: MonitorStore,
        registry: RegistryClient,
        workers: WorkerThreads,
        hasher: SubjectHasher,
    ) -> None:
        self._store = store
        self._registry = registry
        self._workers = workers
        self._hasher = hasher
        self._profiles: dict[str, VersionProfile] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, model_version: str) -> VersionProfile:
        """The profile of an exact version name (``models/m/versions/3``);
        NOT_FOUND from the registry when it has no such version."""
        profile = self._profiles.get(model_version)
        if profile is not None:
            return profile
        lock = self._locks.setdefault(model_version, asyncio.Lock())
        async with lock:
            profile = self._profiles.get(model_version)
            if profile is None:
                profile = await self._load(model_version)
                if len(self._profiles) >= MAX_CACHED:
                    self._profiles.pop(next(iter(self._profiles)))
                self._profiles[model_version] = profile
        return profile

    def forget_model(self, model: str) -> None:
        """Drop the profiles of every version of ``model`` (its config changed)."""
        for name in [n for n in self._profiles if model_of(n) == model]:
            del self._profiles[name]

    def forget_version(self, model_version: str) -> None:
        self._profiles.pop(model_version, None)

    def learned_outputs(self, model_version: str, columns: int) -> None:
        """Remember the width of a version's outputs after its first stored records."""
        profile = self._profiles.get(model_version)
        if profile is not None and profile.output_columns is None:
            self._profiles[model_version] = replace(profile, output_columns=columns)

    async def config(self, model: str) -> pb.MonitoringConfig:
        stored = await self._workers.run(self._store.config, model)
        return stored if stored is not None else configs.default_config(model)

    async def _load(self, model_version: str) -> VersionProfile:
        version = await self._registry.version(model_version)
        model = model_of(model_version)
        config = await self.config(model)
        resolved = configs.resolve(config)
        stored = await self._workers.run(self._store.reference, model_version)
        reference: pb.Reference | None = None
        data: ReferenceData | None = None
        scorer: OutlierScorer | None = None
        if stored is not None:
            reference, raw, scorer_bytes, method = stored
            data = ReferenceData.from_bytes(raw)
            if scorer_bytes is not None and method == resolved.outlier_method.value:
                scorer = OutlierScorer.from_bytes(scorer_bytes)
        elif version.HasField("reference_statistics") and version.reference_statistics.features:
            reference, data = await self._workers.run(
                _training_reference,
                model_version,
                version.reference_statistics,
                version.lineage.dataset,
            )
        if reference is not None and data is not None:
            schema = FeatureSchema(tuple(reference.features))
            if scorer is None:
                # First use, or the outlier method changed: fit and keep it.
                scorer = await self._workers.run(_fit_or_none, schema, data, resolved, self._hasher)
                await self._workers.run(
                    self._store.put_reference,
                    model_version,
                    reference,
                    data.to_bytes(),
                    None if scorer is None else scorer.to_bytes(),
                    resolved.outlier_method.value,
                )
            data = _private(schema, data, resolved.privacy, self._hasher)
        else:
            schema = _signature_schema(version)
        output_columns = (
            reference.output_columns if reference and reference.output_columns else None
        )
        if output_columns is None:
            output_columns = await self._workers.run(
                self._store.version_output_columns, model_version
            )
        return VersionProfile(
            model_version=model_version,
            model=model,
            schema=schema,
            config=resolved,
            reference=reference,
            reference_data=data,
            scorer=scorer,
            output_columns=output_columns,
            registered_metrics=dict(version.metrics),
            settings_time_us=max(
                config.update_time.ToMicroseconds(),
                reference.create_time.ToMicroseconds() if reference is not None else 0,
            ),
        )


async def resolve_version(registry: RegistryClient, name: str, *, field: str) -> str:
    """An exact version name for ``name`` (an alias resolved through the
    registry); NOT_FOUND when the model, version or alias does not exist."""
    ref = names.parse_model_version_ref(name, field=field)
    if ref.version is not None:
        await registry.version(str(ref))
        return str(ref)
    return (await registry.version(str(ref))).name


def require_reference(profile: VersionProfile) -> tuple[pb.Reference, ReferenceData]:
    """FAILED_PRECONDITION for a version without a reference."""
    if profile.reference is None or profile.reference_data is None:
        raise FailedPreconditionError(
            f"{profile.model_version} has no reference: register training statistics "
            "with the version or upload one with SetReference",
            reason="NO_REFERENCE",
        )
    return profile.reference, profile.reference_data


def build_reference(
    model_version: str,
    schema: FeatureSchema,
    data: ReferenceData,
    *,
    output_type: int,
    source: int,
    row_count: int,
    dataset: str = "",
) -> pb.Reference:
    reference = pb.Reference(
        name=reference_name(model_version),
        source=source,  # type: ignore[arg-type]
        features=schema.features,
        output_type=output_type,  # type: ignore[arg-type]
        row_count=row_count,
        output_columns=data.outputs.shape[1],
        feature_summaries=summaries(schema, data),
        dataset=dataset,
    )
    reference.create_time.GetCurrentTime()
    return reference


def _training_reference(
    model_version: str, statistics: registry_pb.ReferenceStatistics, dataset: str
) -> tuple[pb.Reference, ReferenceData]:
    schema, data = from_training_statistics(statistics)
    reference = build_reference(
        model_version,
        schema,
        data,
        # Served models end in a softmax (the trainer's `probabilities` output).
        output_type=pb.OUTPUT_TYPE_PROBABILITIES,
        source=pb.REFERENCE_SOURCE_TRAINING_STATISTICS,
        row_count=statistics.row_count,
        dataset=dataset,
    )
    return reference, data


def _signature_schema(version: registry_pb.ModelVersion) -> FeatureSchema:
    """Without a reference: the signature's feature names, all numerical."""
    inputs = version.signature.inputs
    feature_names: list[str] = []
    for tensor in inputs:
        if tensor.feature_names:
            feature_names.extend(tensor.feature_names)
        else:
            width = int(np.prod([d for d in tensor.shape[1:] if d > 0])) if tensor.shape else 1
            feature_names.extend(f"{tensor.name}_{i}" for i in range(width))
    return FeatureSchema(
        tuple(pb.FeatureSpec(name=n, type=pb.FEATURE_TYPE_NUMERICAL) for n in feature_names)
    )


def _private(
    schema: FeatureSchema, data: ReferenceData, privacy: configs.Privacy, hasher: SubjectHasher
) -> ReferenceData:
    """The reference as stored predictions see it: hashed features hashed,
    dropped ones emptied (so frequencies compare like for like)."""
    if not privacy.hashed and not privacy.dropped:
        return data
    numerical = data.numerical.copy()
    categorical = data.categorical.astype(object)  # hashes are wider than the values
    for column, position in enumerate(schema.numerical):
        if schema.features[position].name in privacy.dropped:
            numerical[:, column] = np.nan
    for column, position in enumerate(schema.categorical):
        name = schema.features[position].name
        if name in privacy.dropped:
            categorical[:, column] = ""
        elif name in privacy.hashed:
            categorical[:, column] = [hasher(v) if v else "" for v in categorical[:, column]]
    return ReferenceData(numerical, categorical.astype(np.str_), data.outputs, data.labels)


def fit_reference_scorer(
    schema: FeatureSchema,
    data: ReferenceData,
    resolved: configs.ResolvedConfig,
    hasher: SubjectHasher,
) -> OutlierScorer | None:
    """The outlier scorer of the config's method, fitted on the reference as
    stored predictions see it; ValueError when the reference cannot support it."""
    private = _private(schema, data, resolved.privacy, hasher)
    dropped = resolved.privacy.dropped
    keep_num = [c for c, p in enumerate(schema.numerical) if schema.features[p].name not in dropped]
    keep_cat = [
        c for c, p in enumerate(schema.categorical) if schema.features[p].name not in dropped
    ]
    return fit_scorer(
        resolved.outlier_method,
        private.numerical[:, keep_num],
        private.categorical[:, keep_cat],
        threshold=resolved.outlier_threshold,
    )


def _fit_or_none(
    schema: FeatureSchema,
    data: ReferenceData,
    resolved: configs.ResolvedConfig,
    hasher: SubjectHasher,
) -> OutlierScorer | None:
    """A training-statistics reference may be too small for the method: its
    versions are then served unscored rather than refused."""
    try:
        return fit_reference_scorer(schema, data, resolved, hasher)
    except ValueError as error:
        logger.warning("outlier scoring is off for this reference: %s", error)
        return None


def exact_version(name: str, *, field: str) -> str:
    """``models/m/versions/3`` checked; INVALID_ARGUMENT otherwise (aliases are
    for reads, resolved by the caller)."""
    ref = names.parse_model_version_ref(name, field=field)
    if ref.version is None:
        raise invalid_field(
            field, "a version name (models/{model}/versions/{version}), not an alias"
        )
    return str(ref)
