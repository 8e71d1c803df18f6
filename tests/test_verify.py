"""The exported program, read back from disk and run with NumPy, agrees with MLX on real photos."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from service import export, verify, weights
from service.images import load_rgb
from service.predict import probabilities_of_pixels
from tests.conftest import CLOTHING, SAMPLES


@pytest.fixture(scope="module")
def imagenet(weights_path):
    model, _ = weights.load(weights_path)
    labels = (SAMPLES / "imagenet_labels.txt").read_text().splitlines()
    files = sorted(SAMPLES.glob("*.bmp"))
    pixels = [load_rgb(f) for f in files]
    return model, labels, [f.name for f in files], pixels, probabilities_of_pixels(model, pixels)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_imagenet_head_agrees(imagenet, tmp_path, precision):
    model, labels, names, pixels, reference = imagenet
    package = export.export(model, labels, tmp_path / "ImageNet.mlpackage", export.ExportOptions(precision=precision))
    report = verify.verify(package, reference, pixels, names, labels)
    assert report.precision == precision
    assert report.top1_agreement == 1.0 and not report.mismatches
    assert report.max_abs_diff <= {"float32": 1e-4, "float16": 2e-2}[precision]
    assert report.ok


@pytest.fixture(scope="module")
def clothing_model(weights_path):
    """A head trained with watchtrain on real clothing photos (all 10 labels, 8 photos each)."""
    from service.embeddings import EmbeddingCache, embed
    from service.dataset import labels_of, scan_folder
    from service.pipeline import matrix
    from service.training import HeadSettings, train_head
    import mlx.core as mx

    model, info = weights.load(weights_path)
    photos = [p for p in scan_folder(CLOTHING / "train") if int(p.path.stem[:2], 16) < 12][:200]
    labels = list(labels_of(photos))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(Path(tmp) / "e.sqlite")
        vectors, _, _ = embed(model, info.sha256, photos, cache)
        cache.close()
    x, y = matrix(vectors, photos, labels)
    head = train_head(x, y, x[:0], y[:0], len(labels), HeadSettings(epochs=300))
    return weights.with_head(model, mx.array(head.weight), mx.array(head.bias)), labels


@pytest.fixture(scope="module")
def validation_pixels():
    files = sorted((CLOTHING / "validation").rglob("*.jpg"))[::3][:100]
    assert len(files) == 100
    return [str(f.relative_to(CLOTHING)) for f in files], [load_rgb(f) for f in files]


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_trained_head_agrees_on_100_validation_photos(clothing_model, validation_pixels, tmp_path, precision):
    model, labels = clothing_model
    names, pixels = validation_pixels
    reference = probabilities_of_pixels(model, pixels)
    package = export.export(model, labels, tmp_path / "Clothing.mlpackage", export.ExportOptions(precision=precision))
    report = verify.verify(package, reference, pixels, names, labels)
    assert report.n == 100 and report.top1_agreement == 1.0, (report.mismatches, report.ambiguous)
    assert report.max_abs_diff <= {"float32": 1e-4, "float16": 2e-2}[precision]


def test_imagenet_normalization_and_symmetric_padding_export_exactly(weights_path, imagenet, tmp_path):
    """ImageNet mean/std (std folded into the stem) and symmetric pads: the other two variants."""
    import mlx.core as mx

    tensors, meta = mx.load(str(weights_path), return_metadata=True)
    variant = tmp_path / "variant.safetensors"
    mx.save_safetensors(str(variant), tensors, metadata={**meta, "padding": "symmetric", "normalization": "imagenet"})
    model, info = weights.load(variant)
    assert (info.spec.padding, info.spec.normalization) == ("symmetric", "imagenet")
    _, labels, names, pixels, _ = imagenet
    reference = probabilities_of_pixels(model, pixels)
    package = export.export(model, labels, tmp_path / "V.mlpackage", export.ExportOptions(precision="float32"))
    report = verify.verify(package, reference, pixels, names, labels)
    assert report.ok and report.max_abs_diff <= 1e-4


def test_8bit_weights_are_smaller_and_still_agree(imagenet, tmp_path):
    model, labels, names, pixels, reference = imagenet
    full = export.export(model, labels, tmp_path / "F.mlpackage", export.ExportOptions(minimum_target="iOS16"))
    small = export.export(model, labels, tmp_path / "Q.mlpackage",
                          export.ExportOptions(weight_bits=8, minimum_target="iOS16"))
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert size(small) < 0.6 * size(full)
    report = verify.verify(small, reference, pixels, names, labels)
    assert report.precision == "int8" and report.ok and report.top1_agreement == 1.0 and not report.ambiguous
    with pytest.raises(ValueError, match="iOS16"):
        export.export(model, labels, tmp_path / "X.mlpackage", export.ExportOptions(weight_bits=8))


def _linear_weight_offset(package: Path) -> tuple[int, tuple[int, ...]]:
    program = verify.load_program(package)
    for op in program.operations:
        if op.type == "const" and op.outputs[0].name.startswith("linear_0_weight"):
            value = op.attributes["val"]
            return value.blobFileValue.offset, tuple(d.constant.size for d in value.type.tensorType.dimensions)
    raise AssertionError("no linear weight")


def test_one_mutated_weight_fails_verification(imagenet, tmp_path):
    model, labels, names, pixels, reference = imagenet
    package = export.export(model, labels, tmp_path / "M.mlpackage", export.ExportOptions(precision="float32"))
    assert verify.verify(package, reference, pixels, names, labels).ok
    # Blob layout: a 64-byte metadata header, then the data. Change one float of the
    # classifier: the weight from feature 0 to the cat class.
    offset, shape = _linear_weight_offset(package)
    blob = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    header = np.frombuffer(bytes(data[offset : offset + 64]), dtype=np.uint64)
    start = int(header[2])  # data offset recorded in the blob's metadata
    index = 286 * shape[1]
    value = np.frombuffer(bytes(data[start + 4 * index : start + 4 * index + 4]), dtype=np.float32)[0]
    data[start + 4 * index : start + 4 * index + 4] = np.float32(value + 40.0).tobytes()
    blob.write_bytes(bytes(data))
    report = verify.verify(package, reference, pixels, names, labels)
    assert not report.ok
    assert report.max_abs_diff > 1e-4


def test_unknown_operation_fails(imagenet, tmp_path):
    import coremltools as ct

    model, labels, names, pixels, reference = imagenet
    package = export.export(model, labels, tmp_path / "U.mlpackage", export.ExportOptions(precision="float32"))
    model_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = ct.proto.Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    main = spec.mlProgram.functions["main"]
    for op in main.block_specializations[main.opset].operations:
        if op.type == "relu6":
            op.type = "gelu"
            break
    model_file.write_bytes(spec.SerializeToString())
    with pytest.raises(verify.VerificationError, match="'gelu'.*not known"):
        verify.verify(package, reference, pixels, names, labels)


def test_not_a_package_is_a_clear_error(tmp_path):
    with pytest.raises(verify.VerificationError, match="not an .mlpackage"):
        verify.load_program(tmp_path)


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs only on macOS")
def test_core_ml_itself_agrees_on_macos(imagenet, tmp_path):
    model, labels, names, pixels, reference = imagenet
    package = export.export(model, labels, tmp_path / "C.mlpackage")
    report = verify.verify(package, reference, pixels, names, labels)
    assert report.coreml_checked and report.ok


def test_spec_is_what_xcode_expects(imagenet, tmp_path):
    import coremltools as ct

    model, labels, *_ = imagenet
    options = export.ExportOptions(author="Team", license="MIT", version="7", metadata={"trained_at": "now"})
    package = export.export(model, labels, tmp_path / "X.mlpackage", options)
    spec = ct.utils.load_spec(str(package))
    assert [i.name for i in spec.description.input] == ["image"]
    assert spec.description.input[0].type.imageType.width == 224
    assert spec.description.input[0].type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert sorted(o.name for o in spec.description.output) == ["classLabel", "classLabelProbs"]
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabelProbs"
    meta = spec.description.metadata
    assert (meta.author, meta.license, meta.versionString) == ("Team", "MIT", "7")
    assert meta.userDefined["trained_at"] == "now"
    assert verify.load_program(package).labels == labels
    assert spec.specificationVersion == 6  # iOS 15 / macOS 12
    shutil.rmtree(package)


def test_near_tie_flip_is_ambiguous_not_a_failure():
    want = np.array([[0.50, 0.49, 0.01], [0.9, 0.05, 0.05]], np.float32)
    got = np.array([[0.49, 0.50, 0.01], [0.05, 0.9, 0.05]], np.float32)
    failed, ambiguous = verify._mismatches(["tie", "clear"], got, want, "float16")
    assert (failed, ambiguous) == (["clear"], ["tie"])
    assert verify._mismatches(["tie"], got[:1], want[:1], "float32") == (["tie"], [])
