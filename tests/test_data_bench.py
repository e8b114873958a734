"""`facescale bench data` runs end to end and reports every setting it measured."""

import json

import pytest

from facescale.cli import main


def test_bench_data_reports_every_setting(capsys, tmp_path):
    argv = ["bench", "data", "--images", "768", "--workers", "0,1", "--repeats", "1"]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--shuffle-buffer", "256", "--dir", str(tmp_path), "--json"])
    assert done.value.code == 0
    result = json.loads(capsys.readouterr().out)
    rates = result["images_per_s"]
    expected = {"decode_1_cores", "decode_2_cores", "sequential_1_workers_cached_float"} | {
        f"{order}_{w}_workers_{cache}_host"
        for order in ("random", "sequential")
        for w in (0, 1)
        for cache in ("cold", "cached")
    }
    assert set(rates) == expected and all(v > 0 for v in rates.values())
    ratios = result["sequential_1_workers_vs_2_core_decode"]
    assert set(ratios) == {"cold_host", "cached_host", "cached_float"}
    assert set(result["cpu_us_per_image"]) == expected and all(
        v > 0 for v in result["cpu_us_per_image"].values()
    )
    assert 2000 < result["mean_jpeg_bytes"] < 20000
    shards = {
        "local_1_workers_cold_host",
        "local_1_workers_cached_host",
        "http_1_workers_cached_host",
    }
    assert set(result["shards_images_per_s"]) == {f"shards_{k}" for k in shards}
    assert all(v > 0 for v in result["shards_images_per_s"].values())
    assert set(result["shards_vs_2_core_decode"]) == shards
    assert list(tmp_path.iterdir()) == []  # the test rec is removed
