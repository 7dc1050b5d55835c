"""The committed gRPC modules must be exactly what protoc makes of proto/ today."""

from splitnet import protogen


def test_generated_code_matches_proto(tmp_path):
    protogen.generate(tmp_path)
    committed = protogen.ROOT / "splitnet" / "v1"
    for name in protogen.GENERATED:
        fresh = (tmp_path / "splitnet" / "v1" / name).read_text()
        assert (committed / name).read_text() == fresh, (
            f"splitnet/v1/{name} is stale against proto/: run `python -m splitnet.protogen`")
